"""Workers found through DNS (`dns:///host:port`): every address the name resolves to becomes an
endpoint, new ones are followed, gone ones get no new requests while their streams finish."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from infermesh.router.v1 import router_pb2_grpc
from services.common.server import GrpcServer
from services.router.core.domain import EndpointKind
from services.router.discovery import Discovery, plan, resolve_dns, split_addresses
from services.router.endpoints import EndpointMonitor
from tests.integration.router.fakes import FakeWorker, start_fake
from tests.integration.router.helpers import (
    chat_request,
    collect,
    healthy_endpoints,
    router_for,
    text_of,
    wait_until,
)


def test_addresses_and_plans() -> None:
    assert split_addresses(["a:1", "dns:///svc:2", "b:3"]) == (["a:1", "b:3"], ["svc:2"])
    assert plan({"x", "y"}, {"y", "z"}) == ({"z"}, {"x"})


async def test_resolving_a_name_gives_every_address_with_the_port() -> None:
    assert "127.0.0.1:50053" in await resolve_dns("localhost:50053")
    with pytest.raises(OSError):
        await resolve_dns("no-such-host.invalid:1")


@pytest.fixture
async def workers() -> AsyncIterator[tuple[list[FakeWorker], list[GrpcServer]]]:
    fakes = [FakeWorker(f"pod{i}") for i in range(3)]
    servers = [await start_fake(w) for w in fakes]
    yield fakes, servers
    for w in fakes:
        w.release.set()
    for server in servers:
        await server.stop(0)


async def test_pods_come_and_go_with_what_the_name_resolves_to(
    workers: tuple[list[FakeWorker], list[GrpcServer]],
) -> None:
    _, servers = workers
    addresses = [s.address for s in servers]
    answer: set[str] | Exception = {addresses[0]}

    async def resolve(name: str) -> set[str]:
        assert name == "workers.svc:50053"
        if isinstance(answer, Exception):
            raise answer
        return set(answer)

    monitor = EndpointMonitor(
        workers=[], embedders=[], report_interval_ms=20, stale_after_s=0.5, rpc_timeout_s=2, backoff_max_s=0.2
    )
    await monitor.start()
    discovery = Discovery(monitor, [("workers.svc:50053", EndpointKind.WORKER)], 3600, resolve, grace_s=0.2)
    await discovery.start()

    def usable() -> set[str]:
        return {v.address for v in monitor.registry.views(monitor.clock()) if v.usable}

    def listed() -> set[str]:
        return {v.address for v in monitor.registry.views(monitor.clock())}

    try:
        await wait_until(lambda: usable() == {addresses[0]}, what="first pod followed")
        answer = set(addresses)  # scaled up
        await discovery.refresh()
        await wait_until(lambda: usable() == set(addresses), what="every pod followed")

        # A pod leaves: it is no longer listed and gets no new requests.
        answer = {addresses[0], addresses[2]}
        await discovery.refresh()
        assert listed() == {addresses[0], addresses[2]}
        for _ in range(10):
            assert monitor.place(EndpointKind.WORKER, "fake-chat").address != addresses[1]

        # A resolver failure keeps the pool as it was.
        answer = OSError("temporary failure in name resolution")
        await discovery.refresh()
        assert listed() == {addresses[0], addresses[2]}

        # The pod comes back (same address): followed again.
        answer = set(addresses)
        await discovery.refresh()
        await wait_until(lambda: usable() == set(addresses), what="pod back")
    finally:
        await discovery.stop()
        await monitor.stop()


async def test_a_router_configured_with_a_dns_name_serves_through_the_pods_behind_it(
    workers: tuple[list[FakeWorker], list[GrpcServer]],
) -> None:
    _, servers = workers
    server = servers[0]
    port = server.address.rsplit(":", 1)[1]
    async with router_for([f"dns:///localhost:{port}"], discovery_interval_s=0.2) as stub:
        await wait_until(lambda: _has(stub, server.address), what=f"{server.address} discovered and healthy")
        replies = await collect(stub, chat_request("through dns"), timeout=5)
    assert text_of(replies) == "echo: through dns"
    assert replies[0].worker == server.address


async def _has(stub: router_pb2_grpc.InferenceStub, address: str) -> bool:
    return address in await healthy_endpoints(stub)
