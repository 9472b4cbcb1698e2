"""TLS on the public port and mutual TLS between services: a client without a certificate,
with one from another CA, or with an expired one is refused; a certificate of the mesh that is
not the router's is refused the session service's calls (health stays open to it); the router
reaches the session service over mTLS with its own certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from infermesh.session.v1 import session_pb2, session_pb2_grpc
from services.common.tls import make_ca, make_cert
from services.session.server import create_server
from tests.integration.router.helpers import start_router
from tests.integration.session.conftest import session_config

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    ca = make_ca(folder)
    for name in ("router", "session", "client"):
        make_cert(folder, name, ca)
    make_cert(folder, "expired", ca, expired=True)
    other = make_ca(folder, "other-ca")
    make_cert(folder, "stranger", other)
    return folder


def _tls(certs: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "tls_cert_file": str(certs / f"{name}.crt"),
        "tls_key_file": str(certs / f"{name}.key"),
        "tls_ca_file": str(certs / "ca.crt"),
        **extra,
    }


def _credentials(certs: Path, client: str | None, ca: str = "ca") -> grpc.ChannelCredentials:
    key = (certs / f"{client}.key").read_bytes() if client else None
    chain = (certs / f"{client}.crt").read_bytes() if client else None
    return grpc.ssl_channel_credentials((certs / f"{ca}.crt").read_bytes(), key, chain)


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
async def tls_mesh(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    db = tmp_path_factory.mktemp("tls-db") / "session.db"
    session = await create_server(session_config(f"sqlite+aiosqlite:///{db}", **_tls(certs, "session")))
    await session.start()
    router = await start_router(session_address=f"localhost:{session.port}", **_tls(certs, "router"))
    yield session, router
    await router.stop(0)
    await session.stop(0)


async def _get_session(address: str, credentials: grpc.ChannelCredentials) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        try:
            await session_pb2_grpc.SessionStoreStub(channel).GetSession(
                session_pb2.GetSessionRequest(tenant="t", session_id="00000000-0000-0000-0000-000000000000"),
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_the_session_service_answers_only_the_router_certificate(certs, tls_mesh):
    session, _router = tls_mesh
    address = f"localhost:{session.port}"
    # Signed by the mesh CA, so TLS accepts it; but it is not the router's identity.
    code, details = await _get_session(address, _credentials(certs, "client"))
    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert "'client'" in details and "tls_allowed_clients: router" in details
    code, details = await _get_session(address, _credentials(certs, "router"))
    assert code is grpc.StatusCode.NOT_FOUND, details  # served: there is no such session
    # Health stays open to any certificate of the mesh (probes, tools).
    assert await _health(address, _credentials(certs, "client")) is grpc.StatusCode.OK


async def test_services_refuse_clients_without_a_valid_certificate(certs, tls_mesh):
    session, _router = tls_mesh
    address = f"localhost:{session.port}"
    assert await _health(address, _credentials(certs, "router")) is grpc.StatusCode.OK
    assert await _health(address, _credentials(certs, None)) is grpc.StatusCode.UNAVAILABLE  # no certificate
    assert await _health(address, _credentials(certs, "stranger")) is grpc.StatusCode.UNAVAILABLE  # wrong CA
    assert await _health(address, _credentials(certs, "expired")) is grpc.StatusCode.UNAVAILABLE
    assert await _health(address, None) is grpc.StatusCode.UNAVAILABLE  # plaintext


async def test_public_port_speaks_tls_and_the_router_reaches_the_session_service_over_mtls(certs, tls_mesh):
    _session, router = tls_mesh
    address = f"localhost:{router.port}"
    # The public port needs no client certificate (callers use API keys) but does need TLS.
    assert await _health(address, None) is grpc.StatusCode.UNAVAILABLE
    assert await _health(address, _credentials(certs, None, ca="other-ca")) is grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(address, _credentials(certs, None)) as channel:
        stub = router_pb2_grpc.InferenceStub(channel)
        created = await stub.CreateSession(
            router_pb2.CreateSessionRequest(user_id="u", model="m"), timeout=10
        )
        fetched = await stub.GetSession(
            router_pb2.GetSessionRequest(session_id=created.session_id), timeout=10
        )
    assert fetched.session_id == created.session_id


async def test_a_router_without_the_mesh_certificate_cannot_reach_the_session_service(certs, tls_mesh):
    session, _router = tls_mesh
    plain = await start_router(session_address=f"localhost:{session.port}")
    try:
        async with grpc.aio.insecure_channel(plain.address) as channel:
            stub = router_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateSession(router_pb2.CreateSessionRequest(user_id="u", model="m"), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await plain.stop(0)
