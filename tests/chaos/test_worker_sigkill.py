"""Drill 1: SIGKILL a worker while it streams to many clients. Every stream completes through
failover, token for token the same as an unbroken run of the same greedy requests."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.chaos.generation_mesh import (
    PROMPTS,
    Stream,
    generate,
    generation_mesh,
    lost_and_duplicated,
    under_way,
)
from tests.chaos.harness import DrillResult, record

STREAMS = 32
MAX_TOKENS = 32
TIMEOUT_S = 60.0


async def test_sigkill_a_worker_under_concurrent_streams(log_dir: Path) -> None:
    async with generation_mesh(log_dir) as mesh:
        prompts = PROMPTS[:STREAMS]
        reference = await asyncio.gather(
            *(generate(mesh.stub, p, max_tokens=MAX_TOKENS, timeout_s=TIMEOUT_S) for p in prompts)
        )
        unfinished = [(len(r.token_ids), r.code, r.details) for r in reference if not r.ok]
        assert unfinished == [] and all(len(r.token_ids) == MAX_TOKENS for r in reference)

        progress: dict[str, Stream] = {}
        tasks = under_way(mesh, prompts, MAX_TOKENS, TIMEOUT_S, progress)
        # Kill once every stream is under way, on the worker that carries the most of them.
        victim = await mesh.busiest(progress, STREAMS, MAX_TOKENS)
        killed_at = time.monotonic()
        mesh.worker_at(victim).stop(signal.SIGKILL)
        streams = await asyncio.gather(*tasks)

    moved = [s for s in streams if s.failovers]
    lost = dup = 0
    for ref, got in zip(reference, streams, strict=True):
        missing, extra = lost_and_duplicated(ref.token_ids, got.token_ids)
        lost, dup = lost + missing, dup + extra
    # Recovery: from the kill to the first token a moved stream got from its new worker.
    resumed = [min((t for t in s.token_times if t > killed_at), default=killed_at) for s in moved]
    completed = sum(s.ok for s in streams)
    result = record(
        DrillResult(
            drill="1 worker SIGKILL",
            load=f"{STREAMS} streams x {MAX_TOKENS} tokens",
            injected="SIGKILL 1 of 2 workers mid-stream",
            total=STREAMS,
            completed=completed,
            failed=STREAMS - completed,
            lost=lost,
            duplicates=dup,
            recovery_s=max(resumed, default=killed_at) - killed_at,
            note=f"{len(moved)} streams moved",
        )
    )
    result.passed = completed == STREAMS and lost == 0 and dup == 0 and bool(moved)
    assert [s.details for s in streams if not s.ok] == []
    assert moved, "the killed worker carried no unfinished stream"
    assert all(s.workers[-1] != victim for s in moved)
    assert (lost, dup) == (0, 0)
    for ref, got in zip(reference, streams, strict=True):
        assert got.text == ref.text
