"""API key hashes and the audit log on SQLite and Postgres: key changes audited in the same
transaction, the log refuses UPDATE, DELETE and (Postgres) TRUNCATE."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from services.common import apikeys
from services.common.errors import AlreadyExists, NotFound
from services.session import migrate
from services.session.db import create_engine
from services.session.keys_store import AuditEvent, KeyRecord, KeysStore


@pytest.fixture
async def keys(database_url):
    await migrate.upgrade(database_url)
    engine = create_engine(database_url)
    yield KeysStore(engine)
    await engine.dispose()


def _record(tenant: str = "acme", role: str = "user") -> tuple[str, KeyRecord]:
    new = apikeys.generate()
    return new.key, KeyRecord(
        new.prefix, tenant, role, "test", new.salt, new.key_hash, dt.datetime.now(dt.UTC)
    )


async def test_keys_round_trip_and_every_change_is_audited(keys):
    key, record = _record()
    await keys.put_key(record, actor="bootstrap", trace_id="t-1")
    with pytest.raises(AlreadyExists):
        await keys.put_key(record, actor="bootstrap")
    stored = await keys.get_key(record.prefix)
    assert apikeys.verify(apikeys.split(key)[1], stored.salt, stored.key_hash)  # type: ignore[index]
    assert not stored.revoked
    assert (await keys.revoke_key(record.prefix, actor="admin-x")).revoked
    assert (await keys.revoke_key(record.prefix, actor="admin-x")).revoked  # a retry, not an error
    assert (await keys.get_key(record.prefix)).revoked
    with pytest.raises(NotFound):
        await keys.get_key("0" * 12)
    assert [k.prefix for k in await keys.list_keys("acme")] == [record.prefix]
    assert await keys.list_keys("other") == []
    events = await keys.list_audit("acme")
    assert [(e.event, e.key_prefix) for e in events] == [
        ("KEY_REVOKED", record.prefix),
        ("KEY_CREATED", record.prefix),
    ]
    assert events[1].trace_id == "t-1" and "role=user" in events[1].detail


async def test_the_audit_log_is_append_only(keys):
    await keys.append_audit(
        [AuditEvent("PERMISSION_DENIED", "acme", "0123456789ab", method="/x/Y", detail="d" * 5000)]
    )
    [event] = await keys.list_audit(event="PERMISSION_DENIED")
    assert len(event.detail) == 1024  # cut to the column, not refused
    statements = ["UPDATE audit_log SET detail = 'x'", "DELETE FROM audit_log"]
    if keys.engine.dialect.name == "postgresql":  # SQLite has no TRUNCATE (its DELETE covers it)
        statements.append("TRUNCATE audit_log")
    async with keys.engine.connect() as conn:
        for statement in statements:
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                async with conn.begin():
                    await conn.execute(sa.text(statement))
    assert len(await keys.list_audit()) == 1
