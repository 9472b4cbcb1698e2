"""Placement and admission through a real router: work follows measured speed, sessions
stick, failing workers are ejected, a full worker's requests queue by priority."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from infermesh.common.v1.common_pb2 import PRIORITY_BATCH, PRIORITY_INTERACTIVE
from services.common.server import GrpcServer
from tests.integration.router.conftest import Mesh
from tests.integration.router.fakes import FakeWorker, reply_for, start_fake
from tests.integration.router.helpers import chat_request, collect, router_for, wait_healthy, wait_until
from tests.integration.router.test_sessions import new_session

TEN_WORDS = " ".join(f"w{i}" for i in range(10))


async def start_workers(*workers: FakeWorker) -> list[GrpcServer]:
    return [await start_fake(w) for w in workers]


async def stop_all(servers: list[GrpcServer]) -> None:
    for server in servers:
        await server.stop(0)


async def test_work_splits_in_proportion_to_reported_speed() -> None:
    slow, fast = FakeWorker("slow", decode_tokens_per_s=100.0), FakeWorker("fast", decode_tokens_per_s=300.0)
    for worker in (slow, fast):
        worker.token_delay_s = 0.01  # streams overlap, so load reports see them in flight
    servers = await start_workers(slow, fast)
    try:
        async with router_for([s.address for s in servers]) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            used: Counter[str] = Counter()
            for _ in range(4):
                waves = [collect(stub, chat_request(TEN_WORDS, max_tokens=10), timeout=10) for _ in range(20)]
                for responses in await asyncio.gather(*waves):
                    used[responses[0].worker] += 1
            fast_share = used[servers[1].address] / sum(used.values())
            print(f"fast worker share {fast_share:.3f}, ideal 0.750, ratio {fast_share / 0.75:.3f}")
            # Ideal: 300 / (100 + 300) = 0.75 of the requests, all of the same size.
            assert 0.6 <= fast_share <= 0.9, f"fast worker got {fast_share:.2f} of the work, ideal 0.75"
    finally:
        await stop_all(servers)


async def test_sessions_stay_on_the_worker_that_served_them(mesh: Mesh) -> None:
    sessions = [await new_session(mesh) for _ in range(4)]
    placed: dict[str, set[str]] = {s: set() for s in sessions}
    for _ in range(3):
        for session_id in sessions:
            responses = await collect(mesh.stub, chat_request("again", session_id=session_id))
            placed[session_id].add(responses[0].worker)
    assert all(len(workers) == 1 for workers in placed.values()), placed
    # Affinity does not pile every session onto one worker: equals still rotate at first.
    assert len(set().union(*placed.values())) == 2


async def test_repeatedly_failing_worker_is_ejected() -> None:
    bad, good = FakeWorker("bad"), FakeWorker("good", running=1)  # "bad" looks better by load
    bad.fail_with = grpc.StatusCode.UNAVAILABLE
    servers = await start_workers(bad, good)
    try:
        async with router_for([s.address for s in servers], eject_after_errors=2, eject_s=60.0) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            for _ in range(5):
                responses = await collect(stub, chat_request("x"), timeout=5)
                assert responses[0].worker == servers[1].address
            assert len(bad.requests) == 2  # tried twice, then out of placement
    finally:
        await stop_all(servers)


async def test_full_worker_queues_by_priority_and_refuses_deadlines_it_cannot_meet() -> None:
    worker = FakeWorker("only")
    worker.hold_after = 1  # the first stream keeps the only slot until released
    servers = await start_workers(worker)
    try:
        # No headroom: INTERACTIVE queues like the others (see test_admission for the headroom).
        async with router_for([servers[0].address], max_streams_per_worker=1, priority_headroom=0) as stub:
            await wait_healthy(stub, {servers[0].address})
            first = asyncio.create_task(collect(stub, chat_request("first one"), timeout=10))
            await wait_until(lambda: len(worker.requests) == 1, what="first stream started")
            batch = asyncio.create_task(
                collect(stub, chat_request("batch", priority=PRIORITY_BATCH), timeout=10)
            )
            await asyncio.sleep(0.3)  # let it reach the queue before the interactive one
            interactive = asyncio.create_task(
                collect(stub, chat_request("interactive", priority=PRIORITY_INTERACTIVE), timeout=10)
            )
            await asyncio.sleep(0.3)
            assert len(worker.requests) == 1  # both wait in the router, not on the worker

            # 200 tokens at the fake's 42 tokens/s cannot finish within 0.5 s: refused at once.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, chat_request("hurry", max_tokens=200), timeout=0.5)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "deadline cannot be met" in (err.value.details() or "")
            pushback = dict(err.value.trailing_metadata() or ())
            assert int(pushback["grpc-retry-pushback-ms"]) > 0

            worker.hold_after = None
            worker.release.set()
            await asyncio.gather(first, batch, interactive)
            assert [reply_for(r, "") for r in worker.requests] == ["first one", "interactive", "batch"]
    finally:
        await stop_all(servers)
