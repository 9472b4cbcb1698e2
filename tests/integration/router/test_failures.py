"""Workers that are down, stop, hang, drain or fail: the router answers quickly and recovers."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.server import GrpcServer
from tests.integration.router.fakes import CHAT_MODEL, FakeWorker, start_fake
from tests.integration.router.helpers import (
    chat_request,
    collect,
    free_port,
    healthy_endpoints,
    router_for,
    text_of,
    wait_healthy,
    wait_until,
)


async def expect_unavailable(stub: router_pb2_grpc.InferenceStub, **fields: Any) -> str:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, chat_request("anyone?", **fields), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.0  # answered, not left hanging until the deadline
    return err.value.details() or ""


async def test_no_worker_ever_reachable_is_unavailable_at_once() -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with router_for([dead]) as stub:
        details = await expect_unavailable(stub)
        assert "no chat model is available: no worker has reported its models yet" in details
        # Naming a model does not turn this into "unknown model": nothing is known yet.
        assert "no worker has reported" in await expect_unavailable(stub, model=CHAT_MODEL)
        status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
        (endpoint,) = status.endpoints
        assert endpoint.address == dead and not endpoint.healthy
        assert endpoint.detail.startswith("down: UNAVAILABLE")


async def test_worker_that_stops_is_unavailable_quickly_and_found_again() -> None:
    worker = FakeWorker()
    server = await start_fake(worker)
    port = server.port
    async with router_for([server.address]) as stub:
        await wait_healthy(stub, {server.address})
        assert text_of(await collect(stub, chat_request("before"), timeout=5)) == "echo: before"

        await server.stop(0)
        details = await expect_unavailable(stub)
        assert f"model {CHAT_MODEL!r} has no healthy worker" in details
        assert server.address in details

        restarted = await start_fake(FakeWorker(), port=port)
        try:
            await wait_healthy(stub, {restarted.address})
            assert text_of(await collect(stub, chat_request("after"), timeout=5)) == "echo: after"
        finally:
            await restarted.stop(0)


async def test_hung_worker_goes_stale_and_comes_back() -> None:
    worker = FakeWorker()
    server = await start_fake(worker)
    try:
        async with router_for([server.address]) as stub:
            await wait_healthy(stub, {server.address})
            worker.reports_paused = True

            async def stale() -> bool:
                status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
                return status.endpoints[0].detail.startswith("stale")

            await wait_until(stale, timeout=3, what="endpoint stale")
            assert "stale: last load report" in await expect_unavailable(stub)
            worker.reports_paused = False
            await wait_healthy(stub, {server.address})
            assert text_of(await collect(stub, chat_request("back"), timeout=5)) == "echo: back"
    finally:
        await server.stop(0)


async def two_workers(**load: int) -> tuple[list[FakeWorker], list[GrpcServer]]:
    workers = [FakeWorker("a"), FakeWorker("b", **load)]
    return workers, [await start_fake(w) for w in workers]


async def test_draining_or_not_serving_worker_gets_no_new_requests() -> None:
    workers, servers = await two_workers()
    try:
        async with router_for([s.address for s in servers]) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            workers[0].draining = True

            async def only_b() -> bool:
                return await healthy_endpoints(stub) == {servers[1].address}

            await wait_until(only_b, what="worker a draining")
            used = {(await collect(stub, chat_request("x"), timeout=5))[0].worker for _ in range(4)}
            assert used == {servers[1].address}

            # Health turning NOT_SERVING (the first step of a worker's drain) counts too.
            await servers[1].set_serving(False)
            assert "health turned NOT_SERVING" in await expect_unavailable(stub)
    finally:
        for server in servers:
            await server.stop(0)


async def test_least_loaded_worker_is_picked() -> None:
    _, servers = await two_workers(running=2, waiting=3)
    try:
        async with router_for([s.address for s in servers]) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            used = {(await collect(stub, chat_request("x"), timeout=5))[0].worker for _ in range(4)}
            assert used == {servers[0].address}
    finally:
        for server in servers:
            await server.stop(0)


async def test_unavailable_worker_is_replaced_before_the_first_token() -> None:
    workers, servers = await two_workers(running=1)  # "a" is preferred: less loaded
    workers[0].fail_with = grpc.StatusCode.UNAVAILABLE
    try:
        async with router_for([s.address for s in servers]) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            req = chat_request("failover")
            responses = await collect(stub, req, timeout=5)
            assert text_of(responses) == "echo: failover"
            assert responses[0].worker == servers[1].address
            assert [r.request_id for r in workers[0].requests] == [req.request_id]

        async with router_for([s.address for s in servers], failover_attempts=1) as stub:
            await wait_healthy(stub, {s.address for s in servers})
            details = await expect_unavailable(stub)
            assert f"worker {servers[0].address} failed (unavailable: " in details
    finally:
        for server in servers:
            await server.stop(0)


async def test_stopping_worker_is_let_go_so_its_drain_is_not_held() -> None:
    worker = FakeWorker()
    server = await start_fake(worker)
    async with router_for([server.address]) as stub:
        await wait_healthy(stub, {server.address})
        started = time.monotonic()
        # Health goes NOT_SERVING first; the router must close its load and health streams,
        # or the worker's graceful stop would wait out its whole grace period.
        await server.stop(5.0)
        assert time.monotonic() - started < 2.0
        assert "health turned NOT_SERVING" in await expect_unavailable(stub)
