"""API key authentication and role checks for every public RPC, by a server interceptor.

The key comes as `authorization: Bearer <key>` or `x-api-key: <key>` metadata. Its record
(salted hash, tenant, role) is read from the session service and cached for `cache_s`, so a
revoked key stops working on every replica within that time. Health and reflection are
not intercepted. With auth off every caller is the default tenant with the admin role, and
the same code path runs (audit of admin calls included).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from infermesh.session.v1 import governance_pb2, governance_pb2_grpc
from services.common import apikeys
from services.common.errors import DomainError, PermissionDenied, Unauthenticated, Unavailable
from services.common.logs import tenant_var
from services.common.metrics import HandlerInterceptor, checked_first
from services.common.telemetry import span
from services.router import audit
from services.router.core.rbac import AccessRole

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
_PRIORITY_NAMES = {1: "critical", 2: "interactive", 3: "standard", 4: "batch"}
GENERATE = "/infermesh.router.v1.Inference/Generate"
EMBED = "/infermesh.router.v1.Inference/Embed"
_GUARDED = "/infermesh.router.v1."
_AUDITED_CALLS = {
    "/infermesh.router.v1.Inference/DeleteSession": audit.ERASURE,
    "/infermesh.router.v1.Inference/ExportUserData": audit.EXPORT,
}


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: AccessRole
    key_prefix: str = ""  # empty with auth off


principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> Principal | None:
    return principal_var.get()


def authorize_model(model: str) -> None:
    """PERMISSION_DENIED when the caller's role may not use `model` (the resolved model id)."""
    principal = principal_var.get()
    if principal is not None and (why := principal.role.denies_model(model)):
        raise PermissionDenied(why)


@dataclass(frozen=True)
class _Cached:
    record: governance_pb2.ApiKeyRecord | None  # None: no such key
    expires: float


class KeyResolver:
    """Key → Principal, with key records cached for cache_s (unknown keys too)."""

    def __init__(
        self,
        stub: governance_pb2_grpc.GovernanceStub | None,
        roles: Mapping[str, AccessRole],
        *,
        cache_s: float,
        timeout_s: float,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = stub
        self.roles = roles
        self._cache_s = cache_s
        self._timeout_s = timeout_s
        self._max = max_cached
        self._clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()

    def forget(self, prefix: str) -> None:
        self._cache.pop(prefix, None)

    async def _record(self, prefix: str) -> governance_pb2.ApiKeyRecord | None:
        now = self._clock()
        cached = self._cache.get(prefix)
        if cached is not None and cached.expires > now:
            return cached.record
        if self._stub is None:
            raise Unavailable("API keys cannot be checked: no session service is configured")
        record: governance_pb2.ApiKeyRecord | None
        try:
            record = await self._stub.GetApiKey(
                governance_pb2.GetApiKeyRequest(key_prefix=prefix), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise Unavailable(f"API keys cannot be checked now ({exc.code().name}); retry") from None
            record = None
        self._cache[prefix] = _Cached(record, now + self._cache_s)
        self._cache.move_to_end(prefix)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return record

    async def resolve(self, key: str) -> Principal:
        parts = apikeys.split(key)
        if parts is None:
            raise Unauthenticated("malformed API key")
        prefix, secret = parts
        record = await self._record(prefix)
        if record is None or record.revoked or not apikeys.verify(secret, record.salt, record.key_hash):
            raise Unauthenticated(f"API key {prefix} is unknown, revoked or wrong")
        role = self.roles.get(record.role)
        if role is None:
            raise PermissionDenied(f"role {record.role!r} of API key {prefix} is not defined on this router")
        return Principal(record.tenant, role, prefix)


def key_from_metadata(metadata: Any) -> str | None:
    for name, value in metadata or ():
        if name == "x-api-key":
            return str(value).strip()
        if name == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class Authenticator:
    """Authenticates and checks the role of each call to a guarded servicer, then runs it
    with the caller's Principal in a contextvar (read by `tenancy.tenant_of`)."""

    def __init__(
        self,
        resolver: KeyResolver,
        sink: audit.AuditSink,
        *,
        enabled: bool,
        anonymous: Principal,
    ) -> None:
        self.resolver = resolver
        self.sink = sink
        self.enabled = enabled
        self.anonymous = anonymous

    def interceptor(self) -> Authentication:
        return Authentication(self)

    async def admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Principal:
        """The caller's Principal, or an abort with UNAUTHENTICATED / PERMISSION_DENIED."""
        principal = self.anonymous
        try:
            if self.enabled:
                key = key_from_metadata(context.invocation_metadata())
                if not key:
                    raise Unauthenticated(
                        "an API key is required: send 'authorization: Bearer <key>' or 'x-api-key' metadata"
                    )
                principal = await self.resolver.resolve(key)
            why = principal.role.denies_method(method) or _denies_request(principal.role, request)
            if why:
                raise PermissionDenied(why)
        except (Unauthenticated, PermissionDenied) as exc:
            event = audit.AUTH_FAILED if isinstance(exc, Unauthenticated) else audit.PERMISSION_DENIED
            prefix = principal.key_prefix or _prefix_of(context)
            self.sink.record(
                event, principal.tenant if principal.key_prefix else "", prefix, method, exc.message
            )
            await context.abort(exc.code, exc.message)
        except DomainError as exc:
            await context.abort(exc.code, exc.message)
        if method.startswith("/infermesh.router.v1.Admin/"):
            self.sink.record(audit.ADMIN_CALL, principal.tenant, principal.key_prefix, method)
        elif method in _AUDITED_CALLS:
            self.sink.record(_AUDITED_CALLS[method], principal.tenant, principal.key_prefix, method)
        return principal


def _prefix_of(context: grpc.aio.ServicerContext) -> str:
    key = key_from_metadata(context.invocation_metadata())
    parts = apikeys.split(key) if key else None
    return parts[0] if parts else ""


def _denies_request(role: AccessRole, request: Any) -> str | None:
    """Checks that need the request: an explicitly named model, the priority class."""
    model = getattr(request, "model", "")
    if isinstance(model, str) and model and (why := role.denies_model(model)):
        return why
    priority = getattr(request, "priority", None)
    if isinstance(priority, int) and not isinstance(priority, bool):
        return role.denies_priority(_PRIORITY_NAMES.get(priority, "standard"))
    return None


class Authentication(HandlerInterceptor):
    """The server interceptor: each call to the router's own services is authenticated and
    its role checked before the servicer sees it, which then runs with the caller's
    Principal in a contextvar. Health and reflection stay open."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not path.startswith(_GUARDED):
            return handler
        return checked_first(handler, functools.partial(self._admit, path))

    async def _admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        with span("auth"):
            principal = await self.auth.admit(method, request, context)
        # grpc.aio runs each RPC in its own task (its own context copy): no reset needed.
        principal_var.set(principal)
        tenant_var.set(principal.tenant)
