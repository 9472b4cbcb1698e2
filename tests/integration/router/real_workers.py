"""Real workers (the packaged model) served in this process, and multi-turn conversations run
through a router in front of them, counting the workers' prefix-cache hits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.server import GrpcServer
from services.worker.config import WorkerConfig
from services.worker.request import GenerateRequest, SamplingParams
from services.worker.server import build_server
from services.worker.service import WorkerService
from tests.integration.router.fakes import FakeSessionStore, start_fake
from tests.integration.router.helpers import chat_request, start_router, wait_healthy

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small enough to share the CPU: short context, a small KV cache, one torch thread. One fixed
# kernel (dense bfloat16): these tests are about the router's placement, and a worker that
# switched kernels with the batch size would change speed in steps that placement must not chase.
WORKER_SETTINGS: dict[str, Any] = {
    "max_context": 1024,
    "kv_cache_mb": 128,
    "threads": 1,
    "dtype": "bfloat16",
    "weights": "dense",
}

# Placement, not failure detection, is under test: a worker sharing this process's event loop
# and the CPU can miss the fast helpers' 0.5 s staleness window while it prefills, and a stale
# endpoint is no candidate, so a turn would move for a reason that has nothing to do with load.
# For the same reason a gap of 5 s (the default stall timeout) between a turn's first and second
# token, seen here on a 2-core CPU with both workers in this process, is no stall to fail over.
ROUTER_SETTINGS: dict[str, Any] = {"endpoint_stale_s": 5.0, "stall_timeout_s": 30.0}

# Twenty streams make the busy worker's next turn about 2-3x slower by its measured step model
# (3.1x by the prior per-sequence share). The two workers' fixed step costs, measured on one
# shared CPU, differ by up to 2x (0.07-0.14 s seen for identical workers), so a factor of 3
# sits inside the noise; 8 leaves room on both sides: slower (it moves without affinity), yet
# within the factor (it stays with it).
AFFINITY_FACTOR = 8.0

TOPICS = (
    "sailing", "bread", "owls", "trains", "gardens", "violins", "deserts", "bridges",
    "comets", "glaciers", "markets", "lighthouses",
)  # fmt: skip


@dataclasses.dataclass
class RealWorker:
    service: WorkerService
    server: GrpcServer

    @property
    def address(self) -> str:
        return self.server.address

    def prefix_counters(self) -> tuple[int, int]:
        """Prompt tokens found in the prefix cache, and prompt tokens looked up, so far."""
        blocks = self.service.engine.scheduler.blocks
        return blocks.prefix_hits, blocks.prefix_queries

    async def tokens_per_s(self, streams: int, max_tokens: int) -> float:
        """Generated tokens/s with `streams` equal requests at once, straight to the engine."""
        requests = [
            GenerateRequest(
                request_id=f"speed-{i}",
                prompt_token_ids=tuple(range(100, 120)),
                max_tokens=max_tokens,
                sampling=SamplingParams(temperature=0.0, ignore_eos=True),
            )
            for i in range(streams)
        ]
        started = time.perf_counter()
        counts = await asyncio.gather(*(self._generated(r) for r in requests))
        return sum(counts) / (time.perf_counter() - started)

    async def _generated(self, request: GenerateRequest) -> int:
        return sum([len(delta.token_ids) async for delta in self.service.generate(request)])


@contextlib.asynccontextmanager
async def real_workers(*settings: dict[str, Any]) -> AsyncIterator[list[RealWorker]]:
    """One worker per `settings` (overrides of WORKER_SETTINGS), each with its own copy of the
    model, on free ports."""
    started: list[RealWorker] = []
    try:
        for i, own in enumerate(settings):
            config = WorkerConfig(port=0, endpoint_id=f"real-{i}", **{**WORKER_SETTINGS, **own})
            service = await WorkerService.load(config)
            server = build_server(config, service)
            await server.start()
            started.append(RealWorker(service, server))
        yield started
    finally:
        for worker in started:
            await worker.server.stop(1.0)


@dataclasses.dataclass
class AffinityRun:
    """What one set of conversations did to the workers' prefix caches."""

    session_affinity: bool
    turns: int  # Generate calls made
    hit_tokens: int  # prompt tokens the workers found cached
    prompt_tokens: int  # prompt tokens the workers looked up
    moved: int  # turns after the first that ran on another worker than the turn before

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _user_text(topic: str, turn: int) -> str:
    return (
        f"Question {turn + 1} of our talk about {topic}: tell me one more short fact about {topic}, "
        f"different from the ones before, and say how it relates to what you said earlier."
    )


async def _turn(stub: router_pb2_grpc.InferenceStub, session_id: str, text: str, max_tokens: int) -> str:
    """One turn of a session; the worker that served it."""
    request = chat_request(
        text,
        session_id=session_id,
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True),
    )
    return await _served_by(stub, request)


async def _conversation(
    stub: router_pb2_grpc.InferenceStub, topic: str, turns: int, max_tokens: int
) -> list[str]:
    """One session's turns in order; the worker that served each."""
    session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="bench"), timeout=10)
    return [await _turn(stub, session.session_id, _user_text(topic, t), max_tokens) for t in range(turns)]


async def _waves(
    stub: router_pb2_grpc.InferenceStub, topics: list[str], turns: int, max_tokens: int, rng: random.Random
) -> list[list[str]]:
    """Every session's turn t at once, then every session's turn t + 1, ..., each wave sent in a
    new random order; the worker that served each turn, per session."""
    ids = []
    for _ in topics:
        session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="bench"), timeout=10)
        ids.append(session.session_id)
    served: list[list[str]] = [[] for _ in topics]
    for t in range(turns):
        order = rng.sample(range(len(topics)), len(topics))
        places = await asyncio.gather(
            *(_turn(stub, ids[i], _user_text(topics[i], t), max_tokens) for i in order)
        )
        for i, place in zip(order, places, strict=True):
            served[i].append(place)
    return served


async def run_conversations(
    workers: list[RealWorker],
    *,
    session_affinity: bool,
    sessions: int,
    turns: int,
    max_tokens: int,
    topic_offset: int = 0,
    shuffle_seed: int | None = None,
    **router_settings: Any,
) -> AffinityRun:
    """`sessions` conversations at once, each its turns one after another, through a fresh
    router in front of `workers`. Concurrent sessions spread over the workers by predicted
    completion; with affinity a session's later turns stay where its earlier ones ran unless
    that worker is too far behind (affinity_factor). With `shuffle_seed` the turns go in waves,
    each wave's requests in a new random order: a burst alternates between equal workers in
    the order it arrives, so without affinity about half the later turns land on the other
    worker, where sessions that stay in step would otherwise tend to go back where they were.
    Prefix-cache counters are taken before and after: earlier runs on the same workers only
    count through what they left cached."""
    store = FakeSessionStore()
    store_server = await start_fake(store)
    router = await start_router(
        worker_addresses=[w.address for w in workers],
        session_address=store_server.address,
        session_affinity=session_affinity,
        **{**ROUTER_SETTINGS, **router_settings},
    )
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, {w.address for w in workers})
            before = [w.prefix_counters() for w in workers]
            topics = [
                f"{TOPICS[(topic_offset + i) % len(TOPICS)]} #{topic_offset + i}" for i in range(sessions)
            ]
            if shuffle_seed is None:
                served = await asyncio.gather(*(_conversation(stub, t, turns, max_tokens) for t in topics))
            else:
                served = await _waves(stub, topics, turns, max_tokens, random.Random(shuffle_seed))
            after = [w.prefix_counters() for w in workers]
    finally:
        await router.stop(0)
        await store_server.stop(0)
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queried = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    moved = sum(1 for places in served for prev, cur in itertools.pairwise(places) if prev != cur)
    return AffinityRun(session_affinity, sessions * turns, hits, queried, moved)


async def stays_when_its_worker_gets_busy(
    workers: list[RealWorker], *, session_affinity: bool, streams: int = 20, max_tokens: int = 32
) -> bool:
    """A session's first turn; then `streams` long streams straight to the worker that served
    it, until the router sees them; then the session's second turn, `max_tokens` long (decoding
    outweighs its prompt, so the noise in measured prefill speeds cannot decide). Whether it
    stayed."""
    store_server = await start_fake(FakeSessionStore())
    router = await start_router(
        worker_addresses=[w.address for w in workers],
        session_address=store_server.address,
        session_affinity=session_affinity,
        affinity_factor=AFFINITY_FACTOR,
        **ROUTER_SETTINGS,
    )
    hogs: list[asyncio.Task[int]] = []
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            await wait_healthy(stub, {w.address for w in workers})
            session = await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="busy"), timeout=10)
            first = await _turn(stub, session.session_id, _user_text("tides", 0), 8)
            busy = next(w for w in workers if w.address == first)
            hogs = [
                asyncio.create_task(
                    busy._generated(
                        GenerateRequest(
                            request_id=f"hog-{i}",
                            prompt_token_ids=tuple(range(100 + i, 120 + i)),
                            max_tokens=500,
                            sampling=SamplingParams(temperature=0.0, ignore_eos=True),
                        )
                    )
                )
                for i in range(streams)
            ]
            deadline = time.monotonic() + 10
            while await _running(stub, first) < streams:
                assert time.monotonic() < deadline, "the router never saw the worker busy"
                await asyncio.sleep(0.05)
            second = await _turn(stub, session.session_id, _user_text("tides", 1), max_tokens)
    finally:
        for hog in hogs:
            hog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hog
        await router.stop(0)
        await store_server.stop(0)
    return second == first


async def _running(stub: router_pb2_grpc.InferenceStub, address: str) -> int:
    status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    return next((e.load.running for e in status.endpoints if e.address == address), 0)


@dataclasses.dataclass
class SpeedSplit:
    """How requests of one size split between workers, against their reported speeds."""

    served: dict[str, int]  # requests each worker served
    speeds: dict[str, float]  # decode tokens/s each reported, averaged over the waves

    def share(self, address: str) -> float:
        return self.served.get(address, 0) / max(1, sum(self.served.values()))


def best_split(step_s: dict[str, tuple[float, float]], per_wave: int) -> dict[str, float]:
    """Share of a wave of `per_wave` equal decodes on two workers that ends the wave soonest,
    given each worker's step time as fixed + per_sequence * batch: what placement by predicted
    completion aims at. A worker whose step grows little with its batch should take more than
    its speed at one load says."""
    (a, (fa, pa)), (b, (fb, pb)) = step_s.items()
    k = min(
        range(per_wave + 1),
        key=lambda k: max(fa + pa * k if k else 0.0, fb + pb * (per_wave - k) if k < per_wave else 0.0),
    )
    return {a: k / per_wave, b: (per_wave - k) / per_wave}


async def step_line(worker: RealWorker, loads: tuple[int, int], max_tokens: int) -> tuple[float, float]:
    """(fixed, per-sequence) seconds of a decode step, from tokens/s alone at two loads."""
    (b1, b2) = loads
    s1 = b1 / await worker.tokens_per_s(streams=b1, max_tokens=max_tokens)
    s2 = b2 / await worker.tokens_per_s(streams=b2, max_tokens=max_tokens)
    per_sequence = max(0.0, (s2 - s1) / (b2 - b1))
    return max(0.0, s1 - per_sequence * b1), per_sequence


async def split_by_speed(
    stub: router_pb2_grpc.InferenceStub,
    workers: list[RealWorker],
    *,
    waves: int,
    per_wave: int,
    max_tokens: int,
) -> SpeedSplit:
    """`waves` bursts of `per_wave` equal requests through the router at `stub`; the speeds the
    router saw in the workers' load reports are read after each burst."""
    served = dict.fromkeys((w.address for w in workers), 0)
    samples: dict[str, list[float]] = {w.address: [] for w in workers}
    for wave in range(waves):
        requests = [
            chat_request(
                f"Wave {wave}, request {i}: name a colour.",
                max_tokens=max_tokens,
                sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True),
            )
            for i in range(per_wave)
        ]
        for worker in await asyncio.gather(*(_served_by(stub, r) for r in requests)):
            served[worker] += 1
        status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
        for endpoint in status.endpoints:
            if endpoint.address in samples:
                samples[endpoint.address].append(endpoint.load.decode_tokens_per_s)
    return SpeedSplit(served, {a: sum(s) / len(s) for a, s in samples.items()})


async def _served_by(stub: router_pb2_grpc.InferenceStub, request: router_pb2.GenerateRequest) -> str:
    worker = ""
    async for resp in stub.Generate(request, timeout=120):
        worker = worker or resp.worker
    return worker
