"""Drill 2: SIGSTOP a worker (it hangs: connections stay open, nothing answers). The router
stops placing on it once its load reports are late, moves its streams, holds no request past
its deadline, and takes the worker back after SIGCONT."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.chaos.generation_mesh import (
    PROMPTS,
    STALE_S,
    Stream,
    generate,
    generation_mesh,
    under_way,
)
from tests.chaos.harness import DrillResult, record, wait_until

STREAMS = 8
MAX_TOKENS = 32
DEADLINE_S = 30.0


async def test_sigstop_a_worker_then_sigcont(log_dir: Path) -> None:
    async with generation_mesh(log_dir) as mesh:
        progress: dict[str, Stream] = {}
        tasks = under_way(mesh, PROMPTS[:STREAMS], MAX_TOKENS, DEADLINE_S, progress)
        victim = await mesh.busiest(progress, STREAMS, MAX_TOKENS)
        stopped_at = time.monotonic()
        mesh.worker_at(victim).send(signal.SIGSTOP)
        try:
            ejected_s = await wait_until(lambda: mesh.lacks(victim), STALE_S + 10)
            during = await asyncio.gather(
                *(generate(mesh.stub, p, max_tokens=8, timeout_s=DEADLINE_S) for p in PROMPTS[STREAMS:][:4])
            )
            streams = await asyncio.gather(*tasks)
        finally:
            mesh.worker_at(victim).send(signal.SIGCONT)
        continued_at = time.monotonic()
        back_s = await wait_until(lambda: mesh.has(victim), 30)
        after = await generate(mesh.stub, PROMPTS[-1], max_tokens=8, timeout_s=DEADLINE_S)

    everything = [*streams, *during, after]
    completed = sum(s.ok for s in everything)
    late = [s for s in everything if s.elapsed_s > s.timeout_s + 0.5]
    moved = [s for s in streams if victim in s.workers and s.workers[-1] != victim]
    result = record(
        DrillResult(
            drill="2 worker SIGSTOP",
            load=f"{STREAMS} streams + {len(during) + 1} new",
            injected="SIGSTOP 1 of 2 workers, SIGCONT after",
            total=len(everything),
            completed=completed,
            failed=len(everything) - completed,
            recovery_s=back_s,
            note=f"ejected after {ejected_s:.2f}s, {len(moved)} streams moved, {len(late)} past deadline",
        )
    )
    result.passed = completed == len(everything) and not late and ejected_s <= STALE_S + 2.0
    assert [s.details for s in everything if not s.ok] == []
    assert not late
    assert ejected_s <= STALE_S + 2.0  # report interval + staleness window, with room for a busy CPU
    assert moved, "the stopped worker carried no unfinished stream"
    assert all(victim not in s.workers for s in during)
    assert continued_at - stopped_at < DEADLINE_S
