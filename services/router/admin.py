"""Admin service: API keys (created here, only their salted hash stored by the session
service), revocation and listing. AccessRole checks happened in the auth interceptor."""

from __future__ import annotations

import re
from collections.abc import Mapping

import grpc

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from infermesh.session.v1 import governance_pb2, governance_pb2_grpc
from services.common import apikeys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.logs import request_id_var, trace_id_var
from services.common.status import grpc_errors
from services.router.auth import KeyResolver, current_principal
from services.router.core.rbac import AccessRole
from services.router.drain import drain_endpoint
from services.router.endpoints import EndpointMonitor

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NO_STORE = "API keys need the session service (session_address is empty)"


def _actor() -> str:
    principal = current_principal()
    return principal.key_prefix if principal is not None and principal.key_prefix else "anonymous"


def _trace_id() -> str:
    return (trace_id_var.get() or request_id_var.get())[:64]


def _key_info(record: governance_pb2.ApiKeyRecord) -> router_pb2.ApiKeyInfo:
    return router_pb2.ApiKeyInfo(
        key_prefix=record.key_prefix,
        tenant=record.tenant,
        role=record.role,
        description=record.description,
        created_at=record.created_at,
        revoked=record.revoked,
    )


class AdminServicer(router_pb2_grpc.AdminServicer):
    def __init__(
        self,
        stub: governance_pb2_grpc.GovernanceStub | None,
        roles: Mapping[str, AccessRole],
        resolver: KeyResolver,
        timeout_s: float,
        endpoints: EndpointMonitor,
    ) -> None:
        self._stub = stub
        self._endpoints = endpoints  # what DrainEndpoint acts on
        self._roles = roles
        self._resolver = resolver
        self._timeout_s = timeout_s

    def _store(self) -> governance_pb2_grpc.GovernanceStub:
        if self._stub is None:
            raise FailedPrecondition(_NO_STORE)
        return self._stub

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self._timeout_s if remaining is None else min(self._timeout_s, remaining)

    @grpc_errors
    async def CreateApiKey(
        self, request: router_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.CreateApiKeyResponse:
        if not _TENANT_RE.match(request.tenant):
            raise InvalidArgument("tenant", "must be 1-128 characters of letters, digits, '.', '_' or '-'")
        if request.role not in self._roles:
            raise InvalidArgument(
                "role", f"unknown role {request.role!r} (known: {', '.join(sorted(self._roles))})"
            )
        if len(request.description) > 512:
            raise InvalidArgument("description", "must be at most 512 characters")
        store = self._store()
        new = apikeys.generate()
        record = governance_pb2.ApiKeyRecord(
            key_prefix=new.prefix,
            tenant=request.tenant,
            role=request.role,
            description=request.description,
            salt=new.salt,
            key_hash=new.key_hash,
            actor=_actor(),
            trace_id=_trace_id(),
        )
        await store.PutApiKey(governance_pb2.PutApiKeyRequest(key=record), timeout=self._timeout(context))
        return router_pb2.CreateApiKeyResponse(api_key=new.key, key_prefix=new.prefix)

    @grpc_errors
    async def RevokeApiKey(
        self, request: router_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RevokeApiKeyResponse:
        if not apikeys.valid_prefix(request.key_prefix):
            raise InvalidArgument("key_prefix", f"must be {apikeys.PREFIX_CHARS} lowercase hex characters")
        await self._store().RevokeApiKey(
            governance_pb2.RevokeApiKeyRequest(
                key_prefix=request.key_prefix, actor=_actor(), trace_id=_trace_id()
            ),
            timeout=self._timeout(context),
        )
        # This replica stops accepting it at once; the others when their cache entry expires.
        self._resolver.forget(request.key_prefix)
        return router_pb2.RevokeApiKeyResponse()

    @grpc_errors
    async def ListApiKeys(
        self, request: router_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListApiKeysResponse:
        if len(request.tenant) > 128:
            raise InvalidArgument("tenant", "must be at most 128 characters")
        resp = await self._store().ListApiKeys(
            governance_pb2.ListApiKeysRequest(tenant=request.tenant), timeout=self._timeout(context)
        )
        return router_pb2.ListApiKeysResponse(keys=[_key_info(k) for k in resp.keys])

    @grpc_errors
    async def DrainEndpoint(
        self, request: router_pb2.DrainEndpointRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DrainEndpointResponse:
        await drain_endpoint(self._endpoints, request.address, self._timeout(context))
        return router_pb2.DrainEndpointResponse()
