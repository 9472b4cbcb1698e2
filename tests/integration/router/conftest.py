"""A router in front of fake workers, an embedder and a session store, all on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from infermesh.router.v1 import router_pb2_grpc
from services.common.server import GrpcServer
from tests.integration.router.fakes import FakeEmbedder, FakeSessionStore, FakeWorker, start_fake
from tests.integration.router.helpers import start_router, wait_healthy


@dataclass
class Mesh:
    workers: list[FakeWorker]
    worker_servers: list[GrpcServer]
    embedder: FakeEmbedder
    embedder_server: GrpcServer
    sessions: FakeSessionStore
    session_server: GrpcServer
    router: GrpcServer
    channel: grpc.aio.Channel
    stub: router_pb2_grpc.InferenceStub

    @property
    def address(self) -> str:
        return self.router.address


@pytest.fixture(scope="session")
async def mesh() -> AsyncIterator[Mesh]:
    workers = [FakeWorker("w0"), FakeWorker("w1")]
    worker_servers = [await start_fake(w) for w in workers]
    embedder = FakeEmbedder()
    embedder_server = await start_fake(embedder)
    sessions = FakeSessionStore()
    session_server = await start_fake(sessions)
    router = await start_router(
        worker_addresses=[s.address for s in worker_servers],
        embedder_addresses=[embedder_server.address],
        session_address=session_server.address,
    )
    channel = grpc.aio.insecure_channel(router.address)
    stub = router_pb2_grpc.InferenceStub(channel)
    await wait_healthy(stub, {s.address for s in [*worker_servers, embedder_server]})
    yield Mesh(
        workers, worker_servers, embedder, embedder_server, sessions, session_server, router, channel, stub
    )
    await channel.close()
    for server in [router, *worker_servers, embedder_server, session_server]:
        await server.stop(0)
