"""Drain: health goes NOT_SERVING, new work is refused, work in flight finishes.

Draining is one-way, so this runs on a second server of its own; it shares the
session worker's loaded weights (with its own KV cache) instead of loading again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc
from services.worker.runner import ModelRunner
from services.worker.server import build_server
from services.worker.service import WorkerService

from .conftest import RunningWorker

pytestmark = pytest.mark.slow

QUESTION = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="What is the capital of France?")]


@pytest.fixture
async def fresh_worker(worker: RunningWorker) -> AsyncIterator[RunningWorker]:
    shared = worker.service.runner
    runner = ModelRunner(shared.model, shared.device, shared.dtype, max_context=1024)
    config = dataclasses.replace(worker.config, endpoint_id="worker-to-drain")
    service = await WorkerService(
        config, runner, worker.service.tokenizer, worker.service.card.source
    ).start()
    server = build_server(config, service)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield RunningWorker(config, service, server, worker_pb2_grpc.WorkerStub(channel), channel)
    await server.stop(1.0)


async def health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service="infermesh.worker.v1.Worker"), timeout=5)
    return int(resp.status)


async def test_drain_stops_new_work_and_finishes_in_flight(fresh_worker: RunningWorker) -> None:
    stub = fresh_worker.stub
    assert await health_status(fresh_worker.channel) == health_pb2.HealthCheckResponse.SERVING
    in_flight = stub.Generate(
        worker_pb2.GenerateRequest(
            messages=QUESTION, max_tokens=24, sampling=common_pb2.SamplingParams(ignore_eos=True)
        )
    )
    first = await in_flight.read()  # running before the drain arrives
    await stub.Drain(worker_pb2.DrainRequest())

    assert await health_status(fresh_worker.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(worker_pb2.GenerateRequest(messages=QUESTION, max_tokens=4)):
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (info.value.details() or "")

    rest = []
    while (msg := await in_flight.read()) is not grpc.aio.EOF:
        rest.append(msg)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == len(first.token_ids) + sum(len(r.token_ids) for r in rest)

    load = stub.StreamLoad(worker_pb2.StreamLoadRequest(), timeout=10)
    report = await load.read()
    load.cancel()
    assert report.draining
    # Read-only calls still answer while draining.
    info_resp = await stub.GetInfo(worker_pb2.GetInfoRequest())
    assert info_resp.endpoint_id == "worker-to-drain"
    await asyncio.wait_for(fresh_worker.service.engine.wait_idle(), 5)


async def test_shutdown_ends_load_streams_instead_of_waiting_out_the_grace(
    fresh_worker: RunningWorker,
) -> None:
    reports = 0
    live = asyncio.Event()

    async def follow_load() -> None:
        nonlocal reports
        load = fresh_worker.stub.StreamLoad(worker_pb2.StreamLoadRequest(interval_ms=50), timeout=10)
        async for _ in load:
            reports += 1
            if reports >= 2:
                live.set()

    follower = asyncio.create_task(follow_load())
    # Live first: two reports in (a fixed sleep was not always enough on a busy CPU).
    await asyncio.wait_for(live.wait(), 10)
    started = asyncio.get_running_loop().time()
    await fresh_worker.server.stop(grace=5.0)
    await asyncio.wait_for(follower, 1.0)  # the stream ended cleanly, not by an error
    assert asyncio.get_running_loop().time() - started < 2.5


async def test_an_engine_that_dies_turns_health_not_serving(
    fresh_worker: RunningWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's loop dying (here: its step accounting raises) reaches gRPC health through
    the service's serving signal, with no drain or probe in between."""
    assert await health_status(fresh_worker.channel) == health_pb2.HealthCheckResponse.SERVING

    def broken(*args: object) -> None:
        raise RuntimeError("accounting fault")

    monkeypatch.setattr(fresh_worker.service.engine, "_account", broken)
    # The request in flight ends at once, UNAVAILABLE (a router retries it elsewhere), instead
    # of hanging until its deadline.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        stream = fresh_worker.stub.Generate(
            worker_pb2.GenerateRequest(messages=QUESTION, max_tokens=4), timeout=20
        )
        async for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    for _ in range(50):
        if await health_status(fresh_worker.channel) == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.1)
    assert await health_status(fresh_worker.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not fresh_worker.service.engine.alive
