"""Drill 6: offer one worker three times the requests per second it can serve, in mixed
priorities. CRITICAL and INTERACTIVE are served, INTERACTIVE's p99 time to first token stays
within twice its unloaded p99; what is refused is refused at once with RESOURCE_EXHAUSTED and a
retry pushback; nothing is held past its deadline."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from pathlib import Path

import grpc

from infermesh.common.v1 import common_pb2
from tests.chaos.generation_mesh import PROMPTS, Stream, generate, generation_mesh
from tests.chaos.harness import DrillResult, record

MAX_TOKENS = 8
INTERACTIVE = common_pb2.PRIORITY_INTERACTIVE
STREAMS_PER_WORKER = 4
OVERLOAD = 3.0
WINDOW_S = 6.0
# A quarter of the offered load is CRITICAL or INTERACTIVE (0.75x capacity): they fit if the
# router sheds the rest. Deadlines in seconds: the lower classes want answers soon.
CYCLE = [
    (common_pb2.PRIORITY_CRITICAL, 30.0),
    (INTERACTIVE, 30.0),
    *[(common_pb2.PRIORITY_STANDARD, 8.0), (common_pb2.PRIORITY_BATCH, 5.0)] * 3,
]
SLACK_S = 0.5  # a reply may end this long after its deadline (client and router clocks, scheduling)
TTFT_RATIO = 2.0  # INTERACTIVE p99 time to first token under overload / the same unloaded
ALONE = 8  # unloaded INTERACTIVE requests, one at a time


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def test_overload_with_mixed_priorities(log_dir: Path) -> None:
    async with generation_mesh(
        log_dir,
        workers=1,
        max_streams_per_worker=str(STREAMS_PER_WORKER),
        degradation_thresholds_s="2,4,6,10,20",  # the defaults: this drill is about shedding
    ) as mesh:
        # Capacity: requests per second the worker serves with its streams full (after a warm-up
        # round: the first forward passes of a fresh process are slow).
        first = PROMPTS[:STREAMS_PER_WORKER]
        for _ in range(2):
            started = time.monotonic()
            calls = (generate(mesh.stub, p, max_tokens=MAX_TOKENS, timeout_s=60) for p in first)
            assert all(s.ok for s in await asyncio.gather(*calls))
        capacity = STREAMS_PER_WORKER / (time.monotonic() - started)
        alone = [
            await generate(mesh.stub, PROMPTS[i], max_tokens=MAX_TOKENS, timeout_s=60, priority=INTERACTIVE)
            for i in range(ALONE)
        ]

        offered = round(capacity * OVERLOAD * WINDOW_S)
        classes = list(itertools.islice(itertools.cycle(CYCLE), offered))
        tasks: list[asyncio.Task[Stream]] = []
        for i, (priority, deadline) in enumerate(classes):
            prompt = PROMPTS[i % len(PROMPTS)]
            call = generate(mesh.stub, prompt, max_tokens=MAX_TOKENS, timeout_s=deadline, priority=priority)
            tasks.append(asyncio.create_task(call))
            await asyncio.sleep(1 / (capacity * OVERLOAD))
        streams = await asyncio.gather(*tasks)

    by_class: dict[int, list[bool]] = {}
    for (priority, _), stream in zip(classes, streams, strict=True):
        by_class.setdefault(priority, []).append(stream.ok)
    refused = [s for s in streams if s.code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    # A STANDARD or BATCH request admitted while it still fitted may run out of time on a worker
    # slower than predicted: it ends at its deadline (DEADLINE_EXCEEDED), never after it.
    timed_out = [s for s in streams if s.code is grpc.StatusCode.DEADLINE_EXCEEDED]
    other = [s for s in streams if not s.ok and s not in refused and s not in timed_out]
    late = [s for s in streams if s.elapsed_s > s.timeout_s + SLACK_S]
    unloaded_ttft = p99([s.ttft_s for s in alone])
    loaded_ttft = p99(
        [s.ttft_s for (p, _), s in zip(classes, streams, strict=True) if p == INTERACTIVE and s.ok]
    )
    important = by_class[common_pb2.PRIORITY_CRITICAL] + by_class[INTERACTIVE]
    success = sum(important) / len(important)
    completed = sum(s.ok for s in streams)
    shares = ", ".join(
        f"{common_pb2.Priority.Name(p).removeprefix('PRIORITY_').lower()} {sum(v)}/{len(v)}"  # type: ignore[arg-type]
        for p, v in sorted(by_class.items())
    )
    result = record(
        DrillResult(
            drill="6 overload",
            load=f"{OVERLOAD:.0f}x capacity ({capacity:.2f} req/s) for {WINDOW_S:.0f}s, 1 worker",
            injected="mixed priorities; standard/batch with short deadlines",
            total=len(streams),
            completed=completed,
            failed=len(streams) - completed,
            note=(
                f"{shares}; {len(refused)} refused with pushback, {len(timed_out)} ended at their "
                f"deadline, {len(late)} past it; interactive TTFT p99 {loaded_ttft:.3f}s loaded, "
                f"{unloaded_ttft:.3f}s alone ({loaded_ttft / unloaded_ttft:.2f}x)"
            ),
        )
    )
    fast = loaded_ttft <= TTFT_RATIO * unloaded_ttft
    result.passed = (
        success >= 0.99 and all(s.pushback_ms for s in refused) and not other and not late and fast
    )
    failures = [(s.code, s.details[:120], round(s.elapsed_s, 1)) for s in streams if not s.ok]
    assert success >= 0.99, (shares, failures)
    assert all(s.pushback_ms and s.pushback_ms > 0 for s in refused)
    assert [(s.code, s.details) for s in other] == []
    assert not late
    assert fast, f"interactive TTFT p99 {loaded_ttft:.3f}s loaded vs {unloaded_ttft:.3f}s unloaded"
