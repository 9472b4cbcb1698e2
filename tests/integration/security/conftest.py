"""A router with authentication on, in front of a real session service (SQLite) that keeps
the keys and the audit log, and fake workers and embedder; all on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from infermesh.session.v1 import governance_pb2, governance_pb2_grpc
from services.common.server import GrpcServer
from services.session.__main__ import create_key
from services.session.server import SessionServer, create_server
from tests.integration.router.fakes import FakeEmbedder, FakeWorker, start_fake
from tests.integration.router.helpers import start_router, wait_until
from tests.integration.session.conftest import session_config

ROLES = ["narrow:rpcs=inference:models=other-model:priorities=standard,batch"]


@dataclass
class SecureMesh:
    session: SessionServer
    router: GrpcServer
    worker: FakeWorker
    admin_key: str
    governance: governance_pb2_grpc.GovernanceStub
    channel: grpc.aio.Channel

    @property
    def inference(self) -> router_pb2_grpc.InferenceStub:
        return router_pb2_grpc.InferenceStub(self.channel)

    @property
    def admin(self) -> router_pb2_grpc.AdminStub:
        return router_pb2_grpc.AdminStub(self.channel)

    async def new_key(self, tenant: str, role: str) -> router_pb2.CreateApiKeyResponse:
        return await self.admin.CreateApiKey(
            router_pb2.CreateApiKeyRequest(tenant=tenant, role=role),
            timeout=10,
            metadata=bearer(self.admin_key),
        )

    async def audit(self, event: str = "", tenant: str = "") -> list[governance_pb2.AuditEvent]:
        """Audit events once the router's background flush has delivered them."""
        resp = await self.governance.ListAudit(
            governance_pb2.ListAuditRequest(event=event, tenant=tenant, limit=1000), timeout=10
        )
        return list(resp.events)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying an API key, as the CLI and clients send it."""
    return (("authorization", f"Bearer {key}"),)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def secure_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecureMesh]:
    db_file: Path = tmp_path_factory.mktemp("security") / "session.db"
    config = session_config(f"sqlite+aiosqlite:///{db_file}")
    admin_key = await create_key(config, "ops", "admin", "bootstrap admin")
    session = await create_server(config)
    await session.start()
    worker = FakeWorker("w0")
    worker_server = await start_fake(worker)
    embedder_server = await start_fake(FakeEmbedder())
    router = await start_router(
        worker_addresses=[worker_server.address],
        embedder_addresses=[embedder_server.address],
        session_address=session.address,
        auth_enabled=True,
        auth_cache_s=0.2,
        roles=ROLES,
    )
    channel = grpc.aio.insecure_channel(router.address)
    governance_channel = grpc.aio.insecure_channel(session.address)
    mesh = SecureMesh(
        session, router, worker, admin_key, governance_pb2_grpc.GovernanceStub(governance_channel), channel
    )

    async def ready() -> bool:
        status = await mesh.inference.GetClusterStatus(
            router_pb2.GetClusterStatusRequest(), timeout=2, metadata=bearer(admin_key)
        )
        return sum(e.healthy for e in status.endpoints) >= 3

    await wait_until(ready, what="router sees worker, embedder and session")
    yield mesh
    await channel.close()
    await governance_channel.close()
    for server in (router, worker_server, embedder_server, session):
        await server.stop(0)
