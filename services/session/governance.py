"""gRPC servicer of infermesh.session.v1.Governance: API key hashes and the audit log."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from infermesh.session.v1 import governance_pb2, governance_pb2_grpc
from services.common import apikeys
from services.common.errors import InvalidArgument, Unavailable
from services.common.status import grpc_errors
from services.session.keys_store import AuditEvent, KeyRecord, KeysStore

MAX_EVENTS_PER_CALL = 1000
_LIMITS = {"tenant": 128, "role": 64, "description": 512, "actor": 128, "trace_id": 64}


def _check_text(field: str, value: str, *, required: bool = False) -> None:
    if required and not value:
        raise InvalidArgument(field, "must not be empty")
    limit = _LIMITS[field.rsplit(".", 1)[-1]]
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters")


def _check_prefix(field: str, prefix: str) -> None:
    if not apikeys.valid_prefix(prefix):
        raise InvalidArgument(field, f"must be {apikeys.PREFIX_CHARS} lowercase hex characters")


def _timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def key_to_pb(key: KeyRecord, *, secrets: bool = True) -> governance_pb2.ApiKeyRecord:
    return governance_pb2.ApiKeyRecord(
        key_prefix=key.prefix,
        tenant=key.tenant,
        role=key.role,
        description=key.description,
        salt=key.salt if secrets else b"",
        key_hash=key.key_hash if secrets else b"",
        created_at=_timestamp(key.created_at),
        revoked=key.revoked,
    )


def audit_to_pb(event: AuditEvent) -> governance_pb2.AuditEvent:
    out = governance_pb2.AuditEvent(
        id=event.id,
        event=event.event,
        tenant=event.tenant,
        key_prefix=event.key_prefix,
        trace_id=event.trace_id,
        method=event.method,
        detail=event.detail,
    )
    if event.at is not None:
        out.time.CopyFrom(_timestamp(event.at))
    return out


def audit_from_pb(event: governance_pb2.AuditEvent, index: int) -> AuditEvent:
    if not event.event:
        raise InvalidArgument(f"events[{index}].event", "must not be empty")
    at = event.time.ToDatetime(tzinfo=dt.UTC) if event.HasField("time") else None
    return AuditEvent(
        event.event, event.tenant, event.key_prefix, event.trace_id, event.method, event.detail, at
    )


class GovernanceServicer(governance_pb2_grpc.GovernanceServicer):
    def __init__(self, store: KeysStore, ready: Callable[[], bool] = lambda: True) -> None:
        self._store = store
        self._ready = ready

    def _check_ready(self) -> None:
        if not self._ready():
            raise Unavailable("session store is starting: database not reachable or not migrated yet")

    @grpc_errors
    async def PutApiKey(
        self, request: governance_pb2.PutApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> governance_pb2.ApiKeyRecord:
        key = request.key
        _check_prefix("key.key_prefix", key.key_prefix)
        _check_text("key.tenant", key.tenant, required=True)
        _check_text("key.role", key.role, required=True)
        _check_text("key.description", key.description)
        _check_text("key.actor", key.actor)
        _check_text("key.trace_id", key.trace_id)
        if not 8 <= len(key.salt) <= 64:
            raise InvalidArgument("key.salt", "must be 8 to 64 bytes")
        if len(key.key_hash) != 32:
            raise InvalidArgument("key.key_hash", "must be 32 bytes (HMAC-SHA256)")
        self._check_ready()
        record = KeyRecord(
            key.key_prefix,
            key.tenant,
            key.role,
            key.description,
            key.salt,
            key.key_hash,
            dt.datetime.now(dt.UTC),
        )
        stored = await self._store.put_key(record, key.actor or "unknown", key.trace_id)
        return key_to_pb(stored, secrets=False)

    @grpc_errors
    async def GetApiKey(
        self, request: governance_pb2.GetApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> governance_pb2.ApiKeyRecord:
        _check_prefix("key_prefix", request.key_prefix)
        self._check_ready()
        return key_to_pb(await self._store.get_key(request.key_prefix))

    @grpc_errors
    async def RevokeApiKey(
        self, request: governance_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> governance_pb2.ApiKeyRecord:
        _check_prefix("key_prefix", request.key_prefix)
        _check_text("actor", request.actor)
        _check_text("trace_id", request.trace_id)
        self._check_ready()
        key = await self._store.revoke_key(request.key_prefix, request.actor or "unknown", request.trace_id)
        return key_to_pb(key, secrets=False)

    @grpc_errors
    async def ListApiKeys(
        self, request: governance_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> governance_pb2.ListApiKeysResponse:
        _check_text("tenant", request.tenant)
        self._check_ready()
        keys = await self._store.list_keys(request.tenant)
        return governance_pb2.ListApiKeysResponse(keys=[key_to_pb(k, secrets=False) for k in keys])

    @grpc_errors
    async def AppendAudit(
        self, request: governance_pb2.AppendAuditRequest, context: grpc.aio.ServicerContext
    ) -> governance_pb2.AppendAuditResponse:
        if len(request.events) > MAX_EVENTS_PER_CALL:
            raise InvalidArgument("events", f"at most {MAX_EVENTS_PER_CALL} per call")
        events = [audit_from_pb(e, i) for i, e in enumerate(request.events)]
        self._check_ready()
        return governance_pb2.AppendAuditResponse(appended=await self._store.append_audit(events))

    @grpc_errors
    async def ListAudit(
        self, request: governance_pb2.ListAuditRequest, context: grpc.aio.ServicerContext
    ) -> governance_pb2.ListAuditResponse:
        _check_text("tenant", request.tenant)
        self._check_ready()
        events = await self._store.list_audit(request.tenant, request.event, request.limit or 100)
        return governance_pb2.ListAuditResponse(events=[audit_to_pb(e) for e in events])
