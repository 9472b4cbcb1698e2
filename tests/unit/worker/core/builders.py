"""Builders for scheduler tests: schedulers, requests and fake model outputs, no model involved."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence

from services.worker.core.block_manager import BlockManager
from services.worker.core.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from services.worker.core.seq_state import SeqState

_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    *,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_waiting: int = 256,
    max_prefill_chunk: int = 0,
    prefix_caching: bool = True,
    urgent_priority: int = 2,
    max_urgent_steps: int = 2,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching),
        SchedulerLimits(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_waiting=max_waiting,
            max_prefill_chunk=max_prefill_chunk,
            urgent_priority=urgent_priority,
            max_urgent_steps=max_urgent_steps,
        ),
    )


def make_requests(
    n: int,
    prompt_len: int = 10,
    max_new_tokens: int = 8,
    *,
    prefix: Sequence[int] = (),
    stop_token_ids: Sequence[int] = (),
    priority: int = 3,
) -> list[SeqState]:
    """Requests with distinct prompts (after the shared `prefix`), so no two share a block by chance."""
    seqs = []
    for _ in range(n):
        k = next(_ids)
        body = [1000 + k * 1000 + j for j in range(prompt_len - len(prefix))]
        seqs.append(SeqState.new(f"req-{k}", [*prefix, *body], max_new_tokens, stop_token_ids, priority))
    return seqs


def fake_sampled(out: SchedulerOutput, token: Callable[[str], int] = lambda _: 7) -> dict[str, int]:
    """What a model would have sampled: one token for every chunk that ends its sequence's tokens."""
    return {c.request_id: token(c.request_id) for c in out.chunks if c.sample}


def step(
    sched: Scheduler, token: Callable[[str], int] = lambda _: 7
) -> tuple[SchedulerOutput, list[SeqState]]:
    out = sched.schedule()
    finished = sched.update_from_output(out, fake_sampled(out, token))
    check_invariants(sched)
    return out, finished


def run_until_idle(sched: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outputs = []
    for _ in range(max_steps):
        if not sched.has_work():
            return outputs
        outputs.append(step(sched)[0])
    raise AssertionError(f"scheduler still busy after {max_steps} steps")


def check_invariants(sched: Scheduler) -> None:
    """Every block's reference count equals the block tables holding it; free means unreferenced."""
    bm = sched.blocks
    held: collections.Counter[int] = collections.Counter()
    for seq in [*sched.running, *sched.waiting]:
        held.update(seq.block_table)
        assert len(set(seq.block_table)) == len(seq.block_table), seq.request_id
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0, seq.request_id
    for seq in sched.running:
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
    for block in bm.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == held[block.block_id], block
    assert bm.num_free_blocks == sum(1 for b in bm.blocks if b.ref_count == 0)
    assert len(sched.running) <= sched.limits.max_num_seqs
