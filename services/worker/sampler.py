"""Turn logits into the next token: penalties, temperature, top-k/top-p/min-p, seeded draws.

Each draw uses a generator seeded from (request seed, completion step), so the
same seed gives the same tokens, also when a stream resumes on another worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from services.worker.request import SamplingParams

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """Mix (seed, step) into one 64-bit seed (splitmix64), so neighbouring steps are unrelated."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """Make every token already seen less likely (the CTRL/Hugging Face rule)."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(list(set(seen)), dtype=torch.long, device=logits.device)
    scores = logits.index_select(-1, ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.index_copy(-1, ids, scores)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token goes when the tokens before it already reach p; the most likely one always stays.
    drop = (probs.cumsum(-1) - probs) >= p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(
    logits: torch.Tensor, params: SamplingParams, seen: Sequence[int], seed: int, step: int
) -> tuple[int, float | None]:
    """Pick the next token from float32 logits [vocab].

    Returns (token id, log-probability of that token under the model's raw distribution,
    or None when the request did not ask for logprobs).
    """
    raw = logits
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        logits = logits / params.temperature
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        logits = apply_min_p(logits, params.min_p)
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(step_seed(seed, step))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    logprob = float(torch.log_softmax(raw, -1)[token]) if params.logprobs else None
    return token, logprob


class Sampled(Protocol):
    """What batched sampling reads of a sequence."""

    @property
    def sampling(self) -> SamplingParams: ...
    @property
    def seed(self) -> int: ...
    @property
    def step_index(self) -> int: ...
    @property
    def all_ids(self) -> list[int]: ...


def sample_rows(logits: torch.Tensor, seqs: Sequence[Sampled]) -> list[tuple[int, float | None]]:
    """`sample` for each row of float32 logits [n, vocab], row i for seqs[i].

    Greedy rows without a repetition penalty (most of a serving batch) take one argmax over
    all of them, and the rows that ask for logprobs one log-softmax: a call per row costs more
    than the arithmetic at a batch of dozens. The other rows draw one by one with their own
    seeded generators, exactly as `sample` does alone.
    """
    plain = [i for i, s in enumerate(seqs) if s.sampling.greedy and s.sampling.repetition_penalty == 1.0]
    results: list[tuple[int, float | None]] = [(0, None)] * len(seqs)
    if plain:
        rows = torch.tensor(plain, device=logits.device)
        picked = logits.index_select(0, rows).argmax(-1).tolist()
        for i, token in zip(plain, picked, strict=True):
            results[i] = (token, None)
    plain_set = set(plain)
    for i, seq in enumerate(seqs):
        if i not in plain_set:
            seen = seq.all_ids if seq.sampling.repetition_penalty != 1.0 else ()
            results[i] = sample(logits[i], seq.sampling, seen, seq.seed, seq.step_index)
    wanted = [i for i in plain if seqs[i].sampling.logprobs]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        tokens = torch.tensor([results[i][0] for i in wanted], device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, rows), -1).gather(1, tokens.unsqueeze(1))
        for i, value in zip(wanted, logprobs[:, 0].tolist(), strict=True):
            results[i] = (results[i][0], value)
    return results
