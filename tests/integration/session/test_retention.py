"""Retention: sessions past retention_days after their last update are purged, with their messages."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import sqlalchemy as sa

from infermesh.session.v1 import session_pb2, session_pb2_grpc
from services.session.model import NewMessage, NewSession, Role
from services.session.server import create_server
from services.session.sql_store import SqlStore

from .conftest import session_config
from .helpers import TENANT, TIMEOUT_S, append, create, msg, status_of


async def add(store: SqlStore, session_id: str, retention_days: int) -> None:
    await store.create_session(
        NewSession(TENANT, "u", "m", retention_days=retention_days, session_id=session_id)
    )
    await store.append(TENANT, session_id, [NewMessage(int(Role.USER), "hello")])


async def test_purge_removes_only_sessions_past_their_retention(store: SqlStore):
    await add(store, "one-day", 1)
    await add(store, "month", 30)
    await add(store, "forever", 0)
    now = dt.datetime.now(dt.UTC)
    assert await store.purge_expired(now) == []
    assert await store.purge_expired(now + dt.timedelta(hours=23)) == []

    assert await store.purge_expired(now + dt.timedelta(days=2), batch_size=1) == [(TENANT, "one-day")]
    assert sorted(await store.purge_expired(now + dt.timedelta(days=10_000))) == [(TENANT, "month")]
    async with store.engine.connect() as conn:
        left = (await conn.execute(sa.text("SELECT DISTINCT session_pk FROM messages"))).all()
        sessions = (await conn.execute(sa.text("SELECT id FROM sessions"))).scalars().all()
    assert sessions == ["forever"] and len(left) == 1


async def test_an_append_renews_the_retention(store: SqlStore):
    await add(store, "busy", 1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE sessions SET updated_at = :t"),
            {"t": dt.datetime.now(dt.UTC) - dt.timedelta(days=2)},
        )
    await store.append(TENANT, "busy", [NewMessage(int(Role.USER), "still here")])
    assert await store.purge_expired(later - dt.timedelta(days=1)) == []


async def test_the_server_purges_periodically_and_drops_the_cached_window(database_url):
    server = await create_server(session_config(database_url, retention_interval_s=0.05))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = session_pb2_grpc.SessionStoreStub(channel)
            old = await create(stub, retention_days=1)
            kept = await create(stub, retention_days=1)
            for s in (old, kept):
                await append(stub, s.session_id, msg("hi"))
            request = session_pb2.GetWindowRequest(tenant=TENANT, session_id=old.session_id, token_budget=100)
            assert len((await stub.GetWindow(request, timeout=TIMEOUT_S)).messages) == 1
            async with server.store.store.engine.begin() as conn:  # type: ignore[attr-defined]
                await conn.execute(
                    sa.text("UPDATE sessions SET updated_at = :t WHERE id = :id"),
                    {"t": dt.datetime.now(dt.UTC) - dt.timedelta(days=2), "id": old.session_id},
                )
            async with asyncio.timeout(10):
                while True:
                    try:
                        await stub.GetWindow(request, timeout=TIMEOUT_S)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.NOT_FOUND
                        break
                    await asyncio.sleep(0.05)
            err = await status_of(
                stub.GetSession(session_pb2.GetSessionRequest(tenant=TENANT, session_id=old.session_id))
            )
            assert err.code() == grpc.StatusCode.NOT_FOUND
            got = await stub.GetSession(
                session_pb2.GetSessionRequest(tenant=TENANT, session_id=kept.session_id), timeout=TIMEOUT_S
            )
            assert got.last_seq == 1
    finally:
        await server.stop(0)
