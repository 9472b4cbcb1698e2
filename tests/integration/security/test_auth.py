"""API keys end to end through a router with auth on: UNAUTHENTICATED without a valid key,
PERMISSION_DENIED naming what a role may not do, revocation, health and reflection open."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from tests.integration.router.helpers import chat_request, collect, text_of, wait_until
from tests.integration.security.conftest import SecureMesh, bearer

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def test_calls_without_a_valid_key_are_unauthenticated(secure_mesh: SecureMesh):
    stub = secure_mesh.inference
    request = router_pb2.ListModelsRequest()
    assert (await _code(stub.ListModels(request, timeout=5)))[0] is grpc.StatusCode.UNAUTHENTICATED
    for metadata in (
        bearer("not-a-key"),
        bearer("imk_0123456789ab_" + "x" * 43),  # well formed, unknown
        (("x-api-key", secure_mesh.admin_key[:-1] + ("A" if secure_mesh.admin_key[-1] != "A" else "B")),),
    ):
        code, details = await _code(stub.ListModels(request, timeout=5, metadata=metadata))
        assert code is grpc.StatusCode.UNAUTHENTICATED, details
    before = len(secure_mesh.worker.requests)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, chat_request(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert len(secure_mesh.worker.requests) == before  # refused before it reached a worker


PUBLIC_METHODS = [
    (f"/{service.full_name}/{method.name}", method)
    for service in router_pb2.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


@pytest.mark.parametrize(
    "metadata", [(), bearer("imk_0123456789ab_" + "x" * 43)], ids=["no-key", "unknown-key"]
)
async def test_every_public_rpc_is_unauthenticated_without_a_valid_key(secure_mesh: SecureMesh, metadata):
    assert len(PUBLIC_METHODS) == 19  # Inference and Admin: a new RPC is added here by itself
    answered = {}
    for path, method in PUBLIC_METHODS:
        # An empty message of the right type: well formed, so only the missing key can refuse it.
        if method.server_streaming:
            answered[method.name] = await _status(_drain(secure_mesh.channel.unary_stream(path), metadata))
        else:
            answered[method.name] = await _status(
                secure_mesh.channel.unary_unary(path)(b"", timeout=5, metadata=metadata)
            )
    wrong = {name: code for name, code in answered.items() if code is not grpc.StatusCode.UNAUTHENTICATED}
    assert wrong == {}, f"answered without a valid key: {wrong}"


async def _drain(call: grpc.aio.UnaryStreamMultiCallable, metadata) -> None:  # type: ignore[no-untyped-def]
    async for _ in call(b"", timeout=5, metadata=metadata):
        pass


async def _status(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_created_key_works_with_either_header_and_acts_for_its_tenant(secure_mesh: SecureMesh):
    created = await secure_mesh.new_key("team-a", "user")
    assert created.api_key.startswith(f"imk_{created.key_prefix}_")
    stub = secure_mesh.inference
    for metadata in (bearer(created.api_key), (("x-api-key", created.api_key),)):
        replies = await collect(stub, chat_request("hi there"), timeout=10, metadata=metadata)
        assert text_of(replies)
    session = await stub.CreateSession(
        router_pb2.CreateSessionRequest(user_id="u1"), timeout=10, metadata=bearer(created.api_key)
    )
    assert session.tenant == "team-a"
    # Another tenant's key does not see the session.
    other = await secure_mesh.new_key("team-b", "user")
    code, _ = await _code(
        stub.GetSession(
            router_pb2.GetSessionRequest(session_id=session.session_id),
            timeout=10,
            metadata=bearer(other.api_key),
        )
    )
    assert code is grpc.StatusCode.NOT_FOUND


async def test_roles_refuse_rpcs_models_and_priorities_by_name(secure_mesh: SecureMesh):
    user = (await secure_mesh.new_key("team-a", "user")).api_key
    code, details = await _code(
        secure_mesh.admin.ListApiKeys(router_pb2.ListApiKeysRequest(), timeout=5, metadata=bearer(user))
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "ListApiKeys" in details and "'user'" in details

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(
            secure_mesh.inference,
            chat_request(priority=common_pb2.PRIORITY_CRITICAL),
            timeout=5,
            metadata=bearer(user),
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "CRITICAL" in info.value.details()

    narrow = (await secure_mesh.new_key("team-a", "narrow")).api_key
    # The default model is resolved first, then refused by name.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(secure_mesh.inference, chat_request(), timeout=5, metadata=bearer(narrow))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may not use model" in info.value.details()
    code, details = await _code(
        secure_mesh.inference.CreateSession(
            router_pb2.CreateSessionRequest(user_id="u"), timeout=5, metadata=bearer(narrow)
        )
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED and "CreateSession" in details


async def test_a_revoked_key_is_refused(secure_mesh: SecureMesh):
    created = await secure_mesh.new_key("team-c", "user")
    stub = secure_mesh.inference
    await stub.ListModels(router_pb2.ListModelsRequest(), timeout=5, metadata=bearer(created.api_key))
    await secure_mesh.admin.RevokeApiKey(
        router_pb2.RevokeApiKeyRequest(key_prefix=created.key_prefix),
        timeout=5,
        metadata=bearer(secure_mesh.admin_key),
    )
    code, _ = await _code(
        stub.ListModels(router_pb2.ListModelsRequest(), timeout=5, metadata=bearer(created.api_key))
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    listed = await secure_mesh.admin.ListApiKeys(
        router_pb2.ListApiKeysRequest(tenant="team-c"), timeout=5, metadata=bearer(secure_mesh.admin_key)
    )
    assert [(k.key_prefix, k.revoked) for k in listed.keys] == [(created.key_prefix, True)]


async def test_health_and_reflection_stay_open(secure_mesh: SecureMesh):
    health = await health_pb2_grpc.HealthStub(secure_mesh.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(secure_mesh.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = [s.name async for resp in call for s in resp.list_services_response.service]
    assert "infermesh.router.v1.Inference" in names


async def test_security_events_reach_the_audit_log_without_keys(secure_mesh: SecureMesh):
    created = await secure_mesh.new_key("team-d", "user")
    await _code(
        secure_mesh.admin.ListApiKeys(
            router_pb2.ListApiKeysRequest(), timeout=5, metadata=bearer(created.api_key)
        )
    )
    await _code(secure_mesh.inference.ListModels(router_pb2.ListModelsRequest(), timeout=5))

    async def delivered() -> bool:
        denied = await secure_mesh.audit("PERMISSION_DENIED", "team-d")
        return bool(denied) and bool(await secure_mesh.audit("AUTH_FAILED"))

    await wait_until(delivered, timeout=10, what="audit events delivered")
    created_events = await secure_mesh.audit("KEY_CREATED", "team-d")
    assert [e.key_prefix for e in created_events] == [created.key_prefix]
    denied = (await secure_mesh.audit("PERMISSION_DENIED", "team-d"))[0]
    assert denied.key_prefix == created.key_prefix and denied.method.endswith("/ListApiKeys")
    session = await secure_mesh.inference.CreateSession(
        router_pb2.CreateSessionRequest(user_id="u"), timeout=5, metadata=bearer(created.api_key)
    )
    await secure_mesh.inference.DeleteSession(
        router_pb2.DeleteSessionRequest(session_id=session.session_id),
        timeout=5,
        metadata=bearer(created.api_key),
    )

    async def erased() -> bool:
        return bool(await secure_mesh.audit("ERASURE", "team-d"))

    await wait_until(erased, timeout=10, what="erasure audited")
    admin_calls = await secure_mesh.audit("ADMIN_CALL", "ops")
    assert any(e.method.endswith("/CreateApiKey") for e in admin_calls)
    for event in await secure_mesh.audit():
        assert created.api_key not in str(event) and secure_mesh.admin_key not in str(event)
