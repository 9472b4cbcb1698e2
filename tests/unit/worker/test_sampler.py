"""Sampling: greedy, seeded reproducibility, and the top-k / top-p / min-p / penalty masks."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.request import SamplingParams
from services.worker.sampler import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    sample,
    step_seed,
)

NEG_INF = float("-inf")


def logits_from_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != NEG_INF]


def test_greedy_picks_argmax() -> None:
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4])
    assert sample(logits, SamplingParams(), (), seed=0, step=0) == (1, None)


def test_greedy_ignores_seed_and_step() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    picks = {sample(logits, SamplingParams(), (), seed=s, step=s)[0] for s in range(5)}
    assert picks == {int(logits.argmax())}


def test_same_seed_and_step_draw_the_same_token() -> None:
    logits = torch.zeros(50_000)  # uniform: any bias in the draw would show
    params = SamplingParams(temperature=1.0, seed=7)
    first = [sample(logits, params, (), seed=7, step=i)[0] for i in range(20)]
    again = [sample(logits, params, (), seed=7, step=i)[0] for i in range(20)]
    other = [sample(logits, params, (), seed=8, step=i)[0] for i in range(20)]
    assert first == again
    assert first != other
    assert len(set(first)) > 15  # steps draw independently, not the same token each time


def test_step_seed_spreads_neighbours() -> None:
    seeds = {step_seed(1, i) for i in range(1000)} | {step_seed(2, i) for i in range(1000)}
    assert len(seeds) == 2000
    assert all(0 <= s < 2**64 for s in seeds)


def test_sampling_follows_the_distribution() -> None:
    logits = logits_from_probs(0.7, 0.2, 0.1)
    params = SamplingParams(temperature=1.0)
    draws = [sample(logits, params, (), seed=42, step=i)[0] for i in range(2000)]
    share = draws.count(0) / len(draws)
    assert 0.65 < share < 0.75


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(apply_top_k(logits, 2)) == [1, 3]
    assert kept(apply_top_k(logits, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = logits_from_probs(0.5, 0.3, 0.15, 0.05)
    assert kept(apply_top_p(logits, 0.7)) == [0, 1]
    assert kept(apply_top_p(logits, 0.5)) == [0]  # 0.5 alone reaches p
    assert kept(apply_top_p(logits, 0.81)) == [0, 1, 2]
    assert kept(apply_top_p(logits, 0.01)) == [0]  # the most likely token always stays
    assert kept(apply_top_p(logits, 1.0)) == [0, 1, 2, 3]


def test_top_p_keeps_order_of_unsorted_input() -> None:
    logits = logits_from_probs(0.05, 0.3, 0.5, 0.15)
    assert kept(apply_top_p(logits, 0.7)) == [1, 2]


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    logits = logits_from_probs(0.6, 0.25, 0.1, 0.05)
    # threshold 0.2 * 0.6 = 0.12
    assert kept(apply_min_p(logits, 0.2)) == [0, 1]
    assert kept(apply_min_p(logits, 0.0)) == [0, 1, 2, 3]


def test_sampling_never_picks_masked_tokens() -> None:
    logits = logits_from_probs(0.4, 0.3, 0.2, 0.1)
    params = SamplingParams(temperature=1.0, top_k=2)
    draws = {sample(logits, params, (), seed=1, step=i)[0] for i in range(300)}
    assert draws == {0, 1}


def test_repetition_penalty_lowers_seen_tokens_both_signs() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # the input is left alone


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.0])
    assert sample(logits, SamplingParams(repetition_penalty=2.0), [0], seed=0, step=0)[0] == 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprob_is_of_the_raw_distribution(temperature: float) -> None:
    logits = logits_from_probs(0.5, 0.25, 0.25)
    token, logprob = sample(
        logits, SamplingParams(temperature=temperature, logprobs=True), (), seed=3, step=0
    )
    assert logprob == pytest.approx(math.log([0.5, 0.25, 0.25][token]), abs=1e-5)


def test_batched_rows_sample_what_each_row_samples_alone() -> None:
    """Greedy rows share one argmax and one log-softmax; seeded and penalised rows draw on their
    own: every row gets exactly the token (and logprob) `sample` gives it alone."""
    import dataclasses

    from services.worker.sampler import sample_rows

    @dataclasses.dataclass
    class Seq:
        sampling: SamplingParams
        seed: int
        step_index: int
        all_ids: list[int]

    torch.manual_seed(3)
    logits = torch.randn(6, 50)
    seqs = [
        Seq(SamplingParams(), 0, 0, [1]),
        Seq(SamplingParams(logprobs=True), 0, 3, [2]),
        Seq(SamplingParams(temperature=0.8, top_p=0.9, seed=5, logprobs=True), 5, 7, [3]),
        Seq(SamplingParams(repetition_penalty=1.3), 0, 1, [int(logits[3].argmax()), 4]),
        Seq(SamplingParams(temperature=1.2, top_k=5), 11, 2, [5]),
        Seq(SamplingParams(logprobs=True), 0, 0, [6]),
    ]
    alone = [
        sample(
            logits[i],
            s.sampling,
            s.all_ids if s.sampling.repetition_penalty != 1.0 else (),
            s.seed,
            s.step_index,
        )
        for i, s in enumerate(seqs)
    ]
    batched = sample_rows(logits, seqs)
    assert [t for t, _ in batched] == [t for t, _ in alone]
    for (_, got), (_, want) in zip(batched, alone, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, abs=1e-6)
    # The penalty moved row 3 off its raw argmax: that row really went the per-row way.
    assert batched[3][0] != int(logits[3].argmax())
