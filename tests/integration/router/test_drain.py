"""Admin.DrainEndpoint and `infermesh drain`: the drained worker gets no new requests, the
streams it runs finish, and bad addresses are refused with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from infermesh import cli
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.server import GrpcServer
from tests.integration.router.fakes import FakeEmbedder, FakeWorker, start_fake
from tests.integration.router.helpers import (
    chat_request,
    collect,
    healthy_endpoints,
    start_router,
    text_of,
    wait_healthy,
    wait_until,
)


@dataclass
class Pair:
    workers: list[FakeWorker]
    addresses: list[str]
    embedder_address: str
    router: GrpcServer
    stub: router_pb2_grpc.InferenceStub
    admin: router_pb2_grpc.AdminStub


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A router of its own in front of two workers and an embedder (draining changes them)."""
    workers = [FakeWorker("d0"), FakeWorker("d1")]
    servers = [await start_fake(w) for w in workers]
    embedder = await start_fake(FakeEmbedder())
    router = await start_router(
        worker_addresses=[s.address for s in servers], embedder_addresses=[embedder.address]
    )
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = router_pb2_grpc.InferenceStub(channel)
        await wait_healthy(stub, {s.address for s in [*servers, embedder]})
        yield Pair(
            workers,
            [s.address for s in servers],
            embedder.address,
            router,
            stub,
            router_pb2_grpc.AdminStub(channel),
        )
    for server in [router, *servers, embedder]:
        await server.stop(0)


async def test_a_drained_worker_finishes_its_streams_and_gets_no_new_ones(pair: Pair) -> None:
    for worker in pair.workers:
        worker.hold_after = 1
    held = asyncio.create_task(collect(pair.stub, chat_request("still running here"), timeout=10))
    await wait_until(lambda: any(w.tokens_left for w in pair.workers), what="the first request streaming")
    drained, other = pair.workers if pair.workers[0].tokens_left else pair.workers[::-1]
    other.hold_after = None
    address = pair.addresses[pair.workers.index(drained)]

    await pair.admin.DrainEndpoint(router_pb2.DrainEndpointRequest(address=address), timeout=5)
    assert drained.draining

    # The router learns it from the worker's load reports and health.
    async def gone() -> bool:
        return address not in await healthy_endpoints(pair.stub)

    await wait_until(gone, what=f"{address} out of placement")
    before = len(drained.requests)
    replies = [await collect(pair.stub, chat_request(f"after drain {i}"), timeout=5) for i in range(6)]
    assert {r[0].worker for r in replies} == {pair.addresses[pair.workers.index(other)]}
    assert len(drained.requests) == before
    # The stream that was running on the drained worker went on to its end.
    drained.release.set()
    assert text_of(await held) == "echo: still running here"


async def test_bad_addresses_are_refused_with_the_reason(pair: Pair) -> None:
    cases = [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "address: must not be empty"),
        ("10.9.9.9:1", grpc.StatusCode.NOT_FOUND, f"workers: {', '.join(sorted(pair.addresses))}"),
        (pair.embedder_address, grpc.StatusCode.FAILED_PRECONDITION, "only workers can be drained"),
    ]
    for address, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pair.admin.DrainEndpoint(router_pb2.DrainEndpointRequest(address=address), timeout=5)
        assert caught.value.code() is code
        assert message in (caught.value.details() or "")
    assert not any(w.draining for w in pair.workers)


async def test_cli_drain(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    address = pair.addresses[1]
    code = await asyncio.to_thread(cli.main, ["--address", pair.router.address, "drain", address])
    assert code == 0
    assert capsys.readouterr().out == f"{address}: draining (no new requests; in-flight ones finish)\n"
    assert pair.workers[1].draining and not pair.workers[0].draining
    code = await asyncio.to_thread(cli.main, ["--address", pair.router.address, "drain", "10.9.9.9:1"])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: address: '10.9.9.9:1' is not an endpoint")
