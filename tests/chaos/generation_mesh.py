"""What the generation drills share: real workers and a router as their own processes, and
streams that record every token they receive (and when) so a drill can count what was lost or
repeated against an unbroken run of the same greedy requests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.chaos.harness import ServiceProcess, wait_until

# float32 so that a resume (prompt + delivered tokens prefilled at once) computes the same
# logits as the uninterrupted decode; bfloat16 rounding can flip a greedy near-tie.
WORKER_ENV = {
    "INFERMESH_WORKER_THREADS": "1",
    "INFERMESH_WORKER_DTYPE": "float32",
    "INFERMESH_WORKER_KV_CACHE_MB": "128",
    "INFERMESH_WORKER_MAX_CONTEXT": "1024",
    "INFERMESH_WORKER_LOG_LEVEL": "warning",
}
# A hung worker is noticed once its reports are STALE_S late; shorter would take a worker
# busy prefilling on a shared CPU core for a hung one.
STALE_S = 2.0
ROUTER_ENV = {
    "INFERMESH_ROUTER_LOAD_REPORT_INTERVAL_MS": "100",
    "INFERMESH_ROUTER_ENDPOINT_STALE_S": str(STALE_S),
    "INFERMESH_ROUTER_RECONNECT_BACKOFF_MAX_S": "0.5",
    "INFERMESH_ROUTER_STALL_TIMEOUT_S": "2.0",
    # A burst on freshly started workers, whose measured speed is still that of one warm-up
    # sequence, looks like a long wait; these drills are about faults, not about shedding.
    "INFERMESH_ROUTER_DEGRADATION_THRESHOLDS_S": "10,20,30,60,120",
    "INFERMESH_ROUTER_LOG_LEVEL": "warning",
}

PROMPTS = [
    f"Write one sentence about {topic}."
    for topic in (
        "the sea", "a red fox", "winter", "a library", "bread", "the moon", "trains", "a garden",
        "rain", "a violin", "mountains", "coffee", "a lighthouse", "bees", "a desert", "snowflakes",
        "a clock", "the wind", "a river", "owls", "a market", "paper", "a bridge", "thunder",
        "a kite", "salt", "a forest", "the harbor", "candles", "a map", "wolves", "autumn",
    )
]  # fmt: skip


@dataclasses.dataclass
class Mesh:
    workers: list[ServiceProcess]
    router: ServiceProcess
    stub: router_pb2_grpc.InferenceStub

    def worker_at(self, address: str) -> ServiceProcess:
        return next(w for w in self.workers if w.address == address)

    async def healthy(self) -> set[str]:
        status = await self.stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
        return {e.address for e in status.endpoints if e.healthy}

    async def has(self, address: str) -> bool:
        """The router counts `address` as healthy."""
        return address in await self.healthy()

    async def lacks(self, address: str) -> bool:
        return not await self.has(address)

    async def busiest(self, progress: dict[str, Stream], streams: int, max_tokens: int) -> str:
        """Once all `streams` have tokens: the worker carrying the most unfinished ones."""

        def started() -> bool:
            return len(progress) == streams and all(s.token_ids for s in progress.values())

        await wait_until(started, 60)
        on = [s.workers[0] for s in progress.values() if len(s.token_ids) < max_tokens]
        assert on, "every stream finished before the fault could be injected"
        return max(set(on), key=on.count)


@contextlib.asynccontextmanager
async def generation_mesh(log_dir: Path, workers: int = 2, **router_env: str) -> AsyncIterator[Mesh]:
    """`workers` worker processes (loaded side by side) and a router process in front of them."""
    procs = [ServiceProcess("worker", WORKER_ENV, log_dir) for _ in range(workers)]
    router: ServiceProcess | None = None
    try:
        for proc in procs:
            proc.start()
        await asyncio.gather(*(_serving(proc, 240) for proc in procs))
        env = {
            **ROUTER_ENV,
            "INFERMESH_ROUTER_WORKER_ADDRESSES": ",".join(p.address for p in procs),
            **{f"INFERMESH_ROUTER_{k.upper()}": v for k, v in router_env.items()},
        }
        router = await ServiceProcess("router", env, log_dir).started(60)
        async with grpc.aio.insecure_channel(router.address) as channel:
            mesh = Mesh(procs, router, router_pb2_grpc.InferenceStub(channel))
            addresses = {p.address for p in procs}
            await wait_until(lambda: _includes(mesh, addresses), timeout=30)
            yield mesh
    finally:
        for proc in [*procs, *([router] if router else [])]:
            proc.stop()


async def _serving(proc: ServiceProcess, timeout_s: float) -> None:
    """Until `proc` serves; fails at once, with its log, if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await proc.wait_serving(2.0)
            return
        except TimeoutError:
            if proc.proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.service} exited during start:\n{proc.log_tail()}") from None
            if time.monotonic() > deadline:
                raise


async def _includes(mesh: Mesh, addresses: set[str]) -> bool:
    return addresses <= await mesh.healthy()


@dataclasses.dataclass
class Stream:
    """One Generate as the client saw it."""

    prompt: str
    token_ids: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    workers: list[str] = dataclasses.field(default_factory=list)  # in the order they served it
    failovers: int = 0
    finish_reason: int = 0
    code: grpc.StatusCode | None = None
    details: str = ""
    pushback_ms: int | None = None
    started: float = 0.0
    ended: float = 0.0
    timeout_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code is None and self.finish_reason in (
            common_pb2.FINISH_REASON_STOP,
            common_pb2.FINISH_REASON_LENGTH,
        )

    @property
    def ttft_s(self) -> float:
        """Time to the first token (inf when none came)."""
        return self.token_times[0] - self.started if self.token_times else float("inf")

    @property
    def elapsed_s(self) -> float:
        return self.ended - self.started


async def generate(
    stub: router_pb2_grpc.InferenceStub,
    prompt: str,
    *,
    max_tokens: int,
    timeout_s: float,
    priority: int = common_pb2.PRIORITY_UNSPECIFIED,
    on_message: Callable[[Stream], Any] | None = None,
) -> Stream:
    """Greedy, past end-of-sequence, so every answer is exactly `max_tokens` long."""
    request = router_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        priority=priority,  # type: ignore[arg-type]
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )
    out = Stream(prompt, started=time.monotonic(), timeout_s=timeout_s)
    call = stub.Generate(request, timeout=timeout_s)
    try:
        async for resp in call:
            now = time.monotonic()
            out.token_ids.extend(resp.token_ids)
            out.token_times.extend(now for _ in resp.token_ids)
            out.text += resp.text
            if resp.worker:
                out.workers.append(resp.worker)
            out.failovers += sum(d.step == common_pb2.DEGRADATION_STEP_FAILOVER for d in resp.degraded)
            if resp.finish_reason:
                out.finish_reason = resp.finish_reason
            if on_message is not None:
                on_message(out)
    except grpc.aio.AioRpcError as exc:
        out.code, out.details = exc.code(), exc.details() or ""
        pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        out.pushback_ms = None if pushback is None else int(pushback)
    out.ended = time.monotonic()
    return out


def under_way(
    mesh: Mesh, prompts: list[str], max_tokens: int, timeout_s: float, progress: dict[str, Stream]
) -> list[asyncio.Task[Stream]]:
    """Start one stream per prompt; `progress` shows each one as it goes."""
    return [
        asyncio.create_task(
            generate(
                mesh.stub,
                p,
                max_tokens=max_tokens,
                timeout_s=timeout_s,
                on_message=lambda s: progress.__setitem__(s.prompt, s),
            )
        )
        for p in prompts
    ]


def lost_and_duplicated(reference: list[int], got: list[int]) -> tuple[int, int]:
    """Tokens of the unbroken run missing from `got`, and tokens `got` has beyond it.

    Compared position by position: a repeated token shifts everything after it, so a stream
    that is not identical counts its whole differing tail as lost (and any extra as duplicated).
    """
    same = 0
    for a, b in zip(reference, got, strict=False):
        if a != b:
            break
        same += 1
    return len(reference) - same, max(0, len(got) - len(reference))
