"""Drill 8: SIGTERM a worker while it streams. It drains: the router stops placing on it at
once (health NOT_SERVING), its in-flight streams finish (or move), and no client sees an error."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.chaos.generation_mesh import PROMPTS, Stream, generate, generation_mesh, under_way
from tests.chaos.harness import DrillResult, record, wait_until

STREAMS = 32
MAX_TOKENS = 32
DEADLINE_S = 60.0


async def test_sigterm_a_worker_during_streams(log_dir: Path) -> None:
    async with generation_mesh(log_dir) as mesh:
        progress: dict[str, Stream] = {}
        tasks = under_way(mesh, PROMPTS[:STREAMS], MAX_TOKENS, DEADLINE_S, progress)
        victim = await mesh.busiest(progress, STREAMS, MAX_TOKENS)
        proc = mesh.worker_at(victim)
        assert proc.proc is not None
        popen = proc.proc
        terminated_at = time.monotonic()
        proc.send(signal.SIGTERM)
        out_s = await wait_until(lambda: mesh.lacks(victim), 10)
        after = await asyncio.gather(
            *(generate(mesh.stub, p, max_tokens=8, timeout_s=DEADLINE_S) for p in PROMPTS[:4])
        )
        streams = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(popen.wait, 30)
        exited_s = time.monotonic() - terminated_at

    everything = [*streams, *after]
    completed = sum(s.ok for s in everything)
    on_victim = [s for s in streams if victim in s.workers]
    drained = [s for s in on_victim if s.workers[-1] == victim]
    result = record(
        DrillResult(
            drill="8 worker SIGTERM",
            load=f"{STREAMS} streams + {len(after)} new",
            injected="SIGTERM 1 of 2 workers mid-stream",
            total=len(everything),
            completed=completed,
            failed=len(everything) - completed,
            recovery_s=out_s,
            note=(
                f"{len(drained)} finished on the draining worker, {len(on_victim) - len(drained)} moved; "
                f"it exited {code} after {exited_s:.1f}s"
            ),
        )
    )
    result.passed = completed == len(everything) and all(victim not in s.workers for s in after)
    assert [s.details for s in everything if not s.ok] == []
    assert on_victim, "the worker carried no stream when it was told to stop"
    assert all(victim not in s.workers for s in after)  # nothing new went to the draining worker
    assert code == 0
