"""Seeded random streams of add / step / cancel: no block leaks and no negative reference count, ever."""

from __future__ import annotations

import random

import pytest

from services.worker.core.scheduler import AdmissionError
from services.worker.core.seq_state import FinishReason, SeqState
from tests.unit.worker.core.builders import check_invariants, make_scheduler, run_until_idle, step

# Few distinct prefixes so that prefix hits, shared blocks and evictions all happen.
PREFIXES = [list(range(10 * p, 10 * p + 9)) for p in range(3)]
STOP = 3


@pytest.mark.parametrize("seed", range(200))
def test_random_streams_never_leak_blocks(seed: int) -> None:
    rng = random.Random(seed)
    sched = make_scheduler(
        num_blocks=rng.randint(8, 40),
        block_size=rng.choice([1, 2, 4, 16]),
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(1, 48),
        max_waiting=10,
        max_prefill_chunk=rng.choice([0, 3, 8]),
        prefix_caching=rng.random() < 0.8,
    )

    def token(_: str) -> int:
        # Mostly prefix tokens, so answers can line up into cache hits; now and then a stop.
        return STOP if rng.random() < 0.05 else rng.choice(PREFIXES[0])

    added: list[SeqState] = []
    for n in range(rng.randint(10, 120)):
        op = rng.random()
        if op < 0.35:
            prompt = [*rng.choice(PREFIXES), *[500 + n] * rng.randint(0, 20)][: rng.randint(1, 30)]
            seq = SeqState.new(
                f"r{n}", prompt, rng.randint(1, 12), stop_token_ids=[STOP], priority=rng.randint(1, 4)
            )
            try:
                sched.add(seq)
            except AdmissionError:
                continue
            added.append(seq)
        elif op < 0.45:
            # A pass given up part-way: scheduled, never recorded; the work is handed out again.
            sched.schedule()
            check_invariants(sched)
        elif op < 0.85:
            _, finished = step(sched, token)
            assert all(s.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for s in finished)
        elif added:
            sched.finish(rng.choice(added).request_id)
            check_invariants(sched)
    if rng.random() < 0.5:
        for seq in added:
            sched.finish(seq.request_id)
    else:
        run_until_idle(sched)
        for seq in added:
            if seq.finish_reason is FinishReason.LENGTH:
                assert seq.num_output_tokens == seq.max_new_tokens
            elif seq.finish_reason is FinishReason.STOP:
                assert seq.output_ids[-1] == STOP and STOP not in seq.output_ids[:-1]
    check_invariants(sched)
    assert sched.blocks.num_used_blocks == 0
    assert not sched.has_work()


def test_random_streams_exercise_preemption_and_prefix_hits() -> None:
    """The streams above are only worth something if they reach the hard paths."""
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=12, block_size=2, max_num_seqs=8, max_num_batched_tokens=16)
    preemptions = 0
    for n in range(60):
        prompt = [*PREFIXES[n % 2], *[500 + n] * rng.randint(0, 4)]
        sched.add(SeqState.new(f"r{n}", prompt, rng.randint(1, 8)))
        out, _ = step(sched)
        preemptions += len(out.preempted)
    run_until_idle(sched)
    assert preemptions > 0
    assert sched.blocks.prefix_hits > 0
    assert sched.blocks.num_used_blocks == 0
