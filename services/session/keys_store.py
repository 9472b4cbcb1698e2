"""API key hashes and the append-only audit log in the session database.

A key change and its audit event are written in one transaction, so the log never misses
a key that exists or records one that does not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common.errors import AlreadyExists, NotFound
from services.session import db
from services.session.tables import api_keys, audit_log

KEY_CREATED = "KEY_CREATED"
KEY_REVOKED = "KEY_REVOKED"
MAX_AUDIT_PAGE = 1000

# Column widths of audit_log: longer values are cut rather than refused, an audit
# event must never fail because a caller sent a long method name.
_AUDIT_WIDTHS = {"event": 32, "tenant": 128, "key_prefix": 32, "trace_id": 64, "method": 256, "detail": 1024}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class KeyRecord:
    prefix: str
    tenant: str
    role: str
    description: str
    salt: bytes
    key_hash: bytes
    created_at: dt.datetime
    revoked: bool = False


@dataclass(frozen=True)
class AuditEvent:
    event: str
    tenant: str = ""
    key_prefix: str = ""
    trace_id: str = ""
    method: str = ""
    detail: str = ""
    at: dt.datetime | None = None
    id: int = 0


def _key(row: Any) -> KeyRecord:
    return KeyRecord(
        prefix=row.prefix,
        tenant=row.tenant,
        role=row.role,
        description=row.description,
        salt=bytes(row.salt),
        key_hash=bytes(row.key_hash),
        created_at=row.created_at,
        revoked=row.revoked_at is not None,
    )


def _audit_values(event: AuditEvent, now: dt.datetime) -> dict[str, Any]:
    values: dict[str, Any] = {
        name: str(getattr(event, name))[:width] for name, width in _AUDIT_WIDTHS.items()
    }
    values["at"] = event.at or now
    return values


class KeysStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _insert_audit(self, conn: AsyncConnection, events: Sequence[AuditEvent]) -> None:
        if events:
            now = _now()
            await conn.execute(sa.insert(audit_log), [_audit_values(e, now) for e in events])

    async def put_key(self, key: KeyRecord, actor: str, trace_id: str = "") -> KeyRecord:
        event = AuditEvent(
            KEY_CREATED, key.tenant, key.prefix, trace_id, detail=f"role={key.role} by={actor}"
        )
        with db.db_errors():
            async with self.engine.begin() as conn:
                exists = await conn.execute(
                    sa.select(api_keys.c.prefix).where(api_keys.c.prefix == key.prefix)
                )
                if exists.first() is not None:
                    raise AlreadyExists(f"an API key with prefix {key.prefix} exists")
                await conn.execute(
                    sa.insert(api_keys).values(
                        prefix=key.prefix,
                        tenant=key.tenant,
                        role=key.role,
                        description=key.description,
                        salt=key.salt,
                        key_hash=key.key_hash,
                        created_at=key.created_at,
                        revoked_at=None,
                    )
                )
                await self._insert_audit(conn, [event])
        return key

    async def get_key(self, prefix: str) -> KeyRecord:
        with db.db_errors():
            async with self.engine.connect() as conn:
                row = (await conn.execute(sa.select(api_keys).where(api_keys.c.prefix == prefix))).first()
        if row is None:
            raise NotFound(f"no API key with prefix {prefix}")
        return _key(row)

    async def revoke_key(self, prefix: str, actor: str, trace_id: str = "") -> KeyRecord:
        with db.db_errors():
            async with self.engine.begin() as conn:
                row = (await conn.execute(sa.select(api_keys).where(api_keys.c.prefix == prefix))).first()
                if row is None:
                    raise NotFound(f"no API key with prefix {prefix}")
                key = _key(row)
                if key.revoked:
                    return key  # revoking twice is a retry, not an error
                await conn.execute(
                    sa.update(api_keys).where(api_keys.c.prefix == prefix).values(revoked_at=_now())
                )
                event = AuditEvent(KEY_REVOKED, key.tenant, prefix, trace_id, detail=f"by={actor}")
                await self._insert_audit(conn, [event])
        return replace(key, revoked=True)

    async def list_keys(self, tenant: str = "") -> list[KeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.tenant, api_keys.c.created_at)
        if tenant:
            query = query.where(api_keys.c.tenant == tenant)
        with db.db_errors():
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [_key(r) for r in rows]

    async def append_audit(self, events: Sequence[AuditEvent]) -> int:
        with db.db_errors():
            async with self.engine.begin() as conn:
                await self._insert_audit(conn, events)
        return len(events)

    async def list_audit(self, tenant: str = "", event: str = "", limit: int = 100) -> list[AuditEvent]:
        query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(min(max(limit, 1), MAX_AUDIT_PAGE))
        if tenant:
            query = query.where(audit_log.c.tenant == tenant)
        if event:
            query = query.where(audit_log.c.event == event)
        with db.db_errors():
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [
            AuditEvent(r.event, r.tenant, r.key_prefix, r.trace_id, r.method, r.detail, r.at, r.id)
            for r in rows
        ]
