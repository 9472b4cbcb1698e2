"""Drill 3: cancel streams at random points. The worker gets every KV block and sequence back
within seconds of the last cancellation, and thousands of start-cancel cycles leave the worker's
and the router's memory where it was.

Streams go through a router process to a worker process; what the worker holds is read from its
own load reports (StreamLoad), as the router reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.chaos.generation_mesh import PROMPTS, Mesh, generate, generation_mesh
from tests.chaos.harness import DrillResult, record, wait_until

STREAMS = 500
# Cancel points lie within the first CANCEL_WITHIN tokens, but the requests ask for far more:
# a cancellation that did not reach the worker would leave its sequence running for minutes.
CANCEL_WITHIN = 24
MAX_TOKENS = 256
# Deadline streams are INTERACTIVE and shorter, so the router queues them ahead of the long
# STANDARD ones rather than refusing them up front as unable to meet their deadline.
DEADLINE_MAX_TOKENS = 64
RECOVERY_TARGET_S = 5.0
STORM_LIMIT_S = 300.0  # about 20 s when cancels work
# More than the worker runs at once (max_running 64), so some also wait in the worker's queue.
ROUTED_STREAMS = 128
WARM_BATCH = 64
# Start-cancel cycles of the memory check; `make soak` runs the 10,000.
CYCLES = int(os.environ.get("CHAOS_CANCEL_CYCLES", "400"))
WARMUP_CYCLES = 400
CYCLE_CONCURRENCY = 32
CYCLE_MAX_TOKENS = 8
MEMORY_GROWTH_TARGET = 0.05
REPORT_INTERVAL_MS = 50
RSS_INTERVAL_S = 0.5

# How a stream is cancelled: the client cancels it after a random delay (usually before its
# first token, while it still queues), cancels it once k tokens arrived, or lets its deadline
# pass.
EARLY, AFTER_K, DEADLINE = "early", "after k tokens", "deadline"
MODES = (EARLY, AFTER_K, DEADLINE)


@dataclasses.dataclass
class Outcome:
    mode: str
    tokens: int = 0  # received before the stream ended
    code: grpc.StatusCode | None = None
    details: str = ""
    finished: bool = False  # the worker finished it before the cancel point

    @property
    def as_meant(self) -> bool:
        """Ended the way the client ended it (or finished first): no error of the mesh's own."""
        if self.code is grpc.StatusCode.OK:
            return self.finished
        if self.mode != DEADLINE:
            return self.code is grpc.StatusCode.CANCELLED
        return self.code is grpc.StatusCode.DEADLINE_EXCEEDED or self.refused

    @property
    def refused(self) -> bool:
        """Refused up front by the router: its deadline could not be met behind the queue."""
        return self.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "deadline cannot be met" in self.details


class LoadWatch:
    """The worker's StreamLoad reports as they arrive, stamped with the local arrival time."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, common_pb2.LoadReport]] = []

    @property
    def latest(self) -> common_pb2.LoadReport:
        return self.reports[-1][1]

    def idle_since(self, since: float) -> float | None:
        """Arrival time of the first report after `since` with nothing held; None if none yet."""
        for at, report in self.reports:
            if at >= since and idle(report):
                return at
        return None

    def between(self, start: float, end: float) -> list[common_pb2.LoadReport]:
        return [r for at, r in self.reports if start <= at <= end]


def idle(report: common_pb2.LoadReport) -> bool:
    return (
        report.running == 0
        and report.waiting == 0
        and report.kv_blocks_total > 0
        and report.kv_blocks_free == report.kv_blocks_total
    )


@contextlib.asynccontextmanager
async def watching(address: str) -> AsyncIterator[LoadWatch]:
    watch = LoadWatch()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        call = stub.StreamLoad(worker_pb2.StreamLoadRequest(interval_ms=REPORT_INTERVAL_MS))

        async def read() -> None:
            async for report in call:
                watch.reports.append((time.monotonic(), report))

        reader = asyncio.create_task(read())
        try:
            await wait_until(lambda: watch.reports, 10)
            yield watch
        finally:
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@dataclasses.dataclass
class Drill:
    mesh: Mesh
    watch: LoadWatch


@pytest.fixture(scope="module")
async def drill(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Drill]:
    """One worker (its KV cache smaller than the storm wants: sequences get preempted too) and a
    router, shared by both checks: most of the time is the worker loading its model."""
    async with generation_mesh(
        tmp_path_factory.mktemp("logs"),
        workers=1,
        max_streams_per_worker=str(ROUTED_STREAMS),
        # 500 streams queued at once predict their full max_tokens each: about an hour of wait
        # on a shared CPU (3,600-4,600 s seen), though cancels drain them in seconds. This drill
        # is about cancelling them, not about the router shedding them (drill 6 is).
        degradation_thresholds_s="100000,200000,300000,400000,500000",
    ) as mesh:
        async with watching(mesh.workers[0].address) as watch:
            # The router predicts queue waits from the worker's measured speed: let it measure
            # a full batch first, not just the one warm-up sequence of a fresh process.
            warm = [
                generate(mesh.stub, p, max_tokens=16, timeout_s=120)
                for p in PROMPTS * (WARM_BATCH // len(PROMPTS))
            ]
            assert all(s.ok for s in await asyncio.gather(*warm))
            await wait_until(lambda: idle(watch.latest), 30)
            yield Drill(mesh, watch)


async def cancelled_stream(
    stub: router_pb2_grpc.InferenceStub,
    prompt: str,
    mode: str,
    point: float,
    max_tokens: int,
    priority: int = common_pb2.PRIORITY_UNSPECIFIED,
) -> Outcome:
    """One Generate, ended by the client at `point` (seconds, tokens or deadline, per `mode`)."""
    request = router_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        priority=priority,  # type: ignore[arg-type]
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )
    out = Outcome(mode)
    # Only the deadline mode sets one: the router refuses a deadline it predicts to miss, and
    # the other streams are to reach the worker and be cancelled there.
    call = stub.Generate(request, timeout=point if mode == DEADLINE else None)

    async def read() -> None:
        async for resp in call:
            out.tokens += len(resp.token_ids)
            out.finished = out.finished or bool(resp.finish_reason)
            if mode == AFTER_K and out.tokens >= point:
                call.cancel()
                return

    reader = asyncio.create_task(read())
    if mode == EARLY:
        await asyncio.sleep(point)
        call.cancel()
    # A locally cancelled call ends its reader with CancelledError, a failed one with AioRpcError.
    await asyncio.gather(reader, return_exceptions=True)
    out.code = await call.code()
    out.details = await call.details() or ""
    return out


def random_point(rng: random.Random, mode: str, max_tokens: int, spread_s: float) -> float:
    if mode == EARLY:
        return rng.uniform(0.0, spread_s)
    if mode == AFTER_K:
        return rng.randint(1, max_tokens - 1)
    return rng.uniform(0.05, spread_s)


async def test_cancel_500_streams_at_random_points(drill: Drill) -> None:
    rng = random.Random(3)
    mesh, watch = drill.mesh, drill.watch
    assert idle(watch.latest)
    plan = [(mode, random_point(rng, mode, CANCEL_WITHIN, 8.0)) for mode in rng.choices(MODES, k=STREAMS)]

    async def one(i: int, mode: str, point: float) -> Outcome:
        # Spread the starts over a second: streams join while others run and leave.
        await asyncio.sleep(rng.uniform(0, 1.0))
        prompt = PROMPTS[i % len(PROMPTS)]
        if mode == DEADLINE:
            return await cancelled_stream(
                mesh.stub, prompt, mode, point, DEADLINE_MAX_TOKENS, common_pb2.PRIORITY_INTERACTIVE
            )
        return await cancelled_stream(mesh.stub, prompt, mode, point, MAX_TOKENS)

    started = time.monotonic()
    try:
        # No stream but the deadline ones has a deadline of its own. When cancels do not free
        # the worker, the streams queued behind the ones it still runs never get their tokens.
        async with asyncio.timeout(STORM_LIMIT_S):
            outcomes = await asyncio.gather(*(one(i, m, p) for i, (m, p) in enumerate(plan)))
    except TimeoutError:
        load = watch.latest
        raise AssertionError(
            f"the storm did not end within {STORM_LIMIT_S:.0f}s: the worker holds running={load.running} "
            f"waiting={load.waiting} kv_blocks_free={load.kv_blocks_free}/{load.kv_blocks_total}"
        ) from None
    last_cancel = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await wait_until(lambda: watch.idle_since(last_cancel), 2 * RECOVERY_TARGET_S)
    back = watch.idle_since(last_cancel)
    recovery = None if back is None else back - last_cancel
    during = watch.between(started, last_cancel)
    status = await mesh.stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    queued = sum(q.depth for q in status.queues)

    ok = [o for o in outcomes if o.as_meant]
    wrong = sorted({(o.mode, o.code.name if o.code else "none") for o in outcomes if not o.as_meant})
    by_mode = {m: [o for o in outcomes if o.mode == m] for m in MODES}
    peak_running = max((r.running + r.waiting for r in during), default=0)
    peak_blocks = max((r.kv_blocks_total - r.kv_blocks_free for r in during), default=0)
    last = watch.latest
    result = record(
        DrillResult(
            drill="3 cancel storm",
            load=f"{STREAMS} streams asking {DEADLINE_MAX_TOKENS}-{MAX_TOKENS} tokens, 1 worker",
            injected=f"cancel before 1st token / after k<{CANCEL_WITHIN} tokens / deadline",
            total=STREAMS,
            completed=len(ok),
            failed=STREAMS - len(ok),
            recovery_s=recovery,
            note=(
                f"{sum(o.tokens == 0 for o in outcomes)} ended before their first token, "
                f"{sum(o.refused for o in outcomes)} refused for their deadline; "
                + ", ".join(f"{m} {len(v)}" for m, v in by_mode.items())
                + f"; {sum(o.finished for o in outcomes)} finished first; worker peak "
                f"{peak_running} sequences, {peak_blocks}/{last.kv_blocks_total} KV blocks; "
                f"{time.monotonic() - started:.1f}s in all"
            ),
        )
    )
    result.passed = recovery is not None and recovery <= RECOVERY_TARGET_S and not wrong and queued == 0
    # The storm filled the worker, so getting back to idle means something.
    assert peak_running > 0 and peak_blocks > 0
    assert recovery is not None, (
        f"worker still holds running={last.running} waiting={last.waiting} "
        f"kv_blocks_free={last.kv_blocks_free}/{last.kv_blocks_total}"
    )
    assert recovery <= RECOVERY_TARGET_S
    assert wrong == [], sorted({o.details for o in outcomes if not o.as_meant})[:5]
    assert queued == 0
    assert all(by_mode.values()), "every way of cancelling was drawn"


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.asynccontextmanager
async def sampling_rss(pids: dict[str, int]) -> AsyncIterator[dict[str, list[int]]]:
    """RSS of each process every RSS_INTERVAL_S while the block runs (and once at each end)."""
    samples: dict[str, list[int]] = {name: [] for name in pids}

    def sample() -> None:
        for name, pid in pids.items():
            samples[name].append(rss_bytes(pid))

    async def loop() -> None:
        while True:
            sample()
            await asyncio.sleep(RSS_INTERVAL_S)

    task = asyncio.create_task(loop())
    try:
        yield samples
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sample()


def ends(samples: list[int]) -> tuple[float, float]:
    """Median RSS of the first and of the last fifth of the run.

    A Python process's RSS swings by a few percent as its cyclic garbage waits for a full
    collection (every cancelled call leaves some); a leak moves the whole last stretch up.
    """
    k = max(1, len(samples) // 5)
    return statistics.median(samples[:k]), statistics.median(samples[-k:])


async def test_start_cancel_cycles_keep_memory_flat(drill: Drill) -> None:
    rng = random.Random(4)
    mesh, watch = drill.mesh, drill.watch
    procs = {"worker": mesh.workers[0].proc, "router": mesh.router.proc}
    pids = {name: p.pid for name, p in procs.items() if p is not None}
    assert len(pids) == 2
    outcomes: list[Outcome] = []

    async def cycles(n: int) -> None:
        todo = iter(range(n))

        async def loop() -> None:
            for i in todo:
                mode = rng.choice(MODES)
                point = random_point(rng, mode, CYCLE_MAX_TOKENS, 0.3)
                prompt = PROMPTS[i % len(PROMPTS)]
                outcomes.append(await cancelled_stream(mesh.stub, prompt, mode, point, CYCLE_MAX_TOKENS))

        await asyncio.gather(*(loop() for _ in range(CYCLE_CONCURRENCY)))
        await wait_until(lambda: idle(watch.latest), 2 * RECOVERY_TARGET_S)

    await cycles(WARMUP_CYCLES)
    outcomes.clear()
    started = time.monotonic()
    async with sampling_rss(pids) as samples:
        await cycles(CYCLES)
    seconds = time.monotonic() - started

    growth: dict[str, float] = {}
    figures = []
    for name, values in samples.items():
        first, last = ends(values)
        growth[name] = last / first - 1
        figures.append(
            f"{name} RSS {first / 2**20:.0f} -> {last / 2**20:.0f} MiB ({100 * growth[name]:+.1f}%, "
            f"highest {max(values) / 2**20:.0f})"
        )
    ok = sum(o.as_meant for o in outcomes)
    wrong = sorted({(o.mode, o.code.name if o.code else "none") for o in outcomes if not o.as_meant})
    result = record(
        DrillResult(
            drill="3 cancel memory",
            load=f"{CYCLES} start-cancel cycles, {CYCLE_CONCURRENCY} at a time",
            injected="cancel at random points",
            total=len(outcomes),
            completed=ok,
            failed=len(outcomes) - ok,
            note=(
                "; ".join(figures)
                + f": medians of the first and last fifth of the run, after {WARMUP_CYCLES} warm-up "
                f"cycles; {CYCLES / seconds:.0f} cycles/s"
            ),
        )
    )
    result.passed = all(g < MEMORY_GROWTH_TARGET for g in growth.values()) and not wrong
    assert len(outcomes) == CYCLES
    assert wrong == []
    assert growth["worker"] < MEMORY_GROWTH_TARGET, result.note
    assert growth["router"] < MEMORY_GROWTH_TARGET, result.note
