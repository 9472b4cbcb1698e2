"""Encryption at rest seen from outside: the raw tables, the SQLite files and Redis hold no plaintext."""

from __future__ import annotations

import sqlalchemy as sa

from infermesh.common.v1 import common_pb2
from infermesh.session.v1 import session_pb2
from services.session.crypto import KeyRing
from services.session.db import create_engine
from services.session.sql_store import SqlStore

from .conftest import TEST_KEYS
from .helpers import TENANT, TIMEOUT_S, all_history, append, create, msg
from .test_cache import redis_keys, serving

SECRET = "the launch code is 0000-ZEBRA"


async def raw_rows(url: str) -> list[str]:
    """Every row of both tables, each column rendered as text or bytes repr."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            out = []
            for table in ("sessions", "messages"):
                for row in await conn.execute(sa.text(f"SELECT * FROM {table}")):
                    out.extend(repr(value) for value in row)
            return out
    finally:
        await engine.dispose()


async def test_postgres_and_redis_hold_only_ciphertext(pg_url, redis_url):
    async with serving(pg_url, redis_url) as (server, stub):
        s = await create(stub)
        await append(stub, s.session_id, msg(SECRET, common_pb2.ROLE_SYSTEM), msg(SECRET + " again"))
        reply = await stub.GetWindow(
            session_pb2.GetWindowRequest(tenant=TENANT, session_id=s.session_id, token_budget=100),
            timeout=TIMEOUT_S,
        )
        assert [m.content for m in reply.messages] == [SECRET, SECRET + " again"]
        assert [m.content for m in await all_history(stub, s.session_id)] == [SECRET, SECRET + " again"]

        rows = await raw_rows(pg_url)
        assert rows and not any("ZEBRA" in value for value in rows)
        cached = await redis_keys(redis_url, server)
        assert cached and not any(
            b"ZEBRA" in key or any(b"ZEBRA" in field + value for field, value in fields.items())
            for key, fields in cached.items()
        )
        # The content is really there, sealed under the configured key.
        assert any("'test1'" == value for value in rows)


async def test_sqlite_files_hold_only_ciphertext(tmp_path):
    from services.session.server import create_server

    from .conftest import session_config

    server = await create_server(session_config(f"sqlite+aiosqlite:///{tmp_path / 'session.db'}"))
    await server.start()
    try:
        import grpc

        from infermesh.session.v1 import session_pb2_grpc

        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = session_pb2_grpc.SessionStoreStub(channel)
            s = await create(stub)
            await append(stub, s.session_id, msg(SECRET))
            assert [m.content for m in await all_history(stub, s.session_id)] == [SECRET]
    finally:
        await server.stop(0)
    files = list(tmp_path.glob("session.db*"))
    assert files and not any(b"ZEBRA" in f.read_bytes() for f in files)


async def test_rotation_reseals_old_rows_under_the_new_key(database_url):
    from services.session import migrate
    from services.session.model import NewMessage, NewSession, Role

    await migrate.upgrade(database_url)
    old_ring = KeyRing.parse(TEST_KEYS)
    new_ring = KeyRing.parse(f"{KeyRing.new_entry('test2')},{TEST_KEYS}")
    store = SqlStore.from_url(database_url, keys=old_ring)
    try:
        await store.create_session(NewSession(TENANT, "u", "m", session_id="rot"))
        await store.append(TENANT, "rot", [NewMessage(int(Role.USER), f"{SECRET} {n}") for n in range(5)])
    finally:
        await store.close()

    rotated = SqlStore.from_url(database_url, keys=new_ring)
    try:
        # Both keys open before rotation, so reads never wait for it.
        assert len((await rotated.history(TENANT, "rot", 0, 10)).messages) == 5
        assert await rotated.rotate_keys(batch_size=2) == 5
        assert await rotated.rotate_keys() == 0
    finally:
        await rotated.close()

    # Only the new key is needed from now on: the old one can leave the ring.
    only_new = SqlStore.from_url(database_url, keys=KeyRing({"test2": new_ring.keys["test2"]}, "test2"))
    try:
        page = await only_new.history(TENANT, "rot", 0, 10)
        assert [m.content for m in page.messages] == [f"{SECRET} {n}" for n in range(5)]
        async with only_new.engine.connect() as conn:
            key_ids = (await conn.execute(sa.text("SELECT DISTINCT key_id FROM messages"))).scalars().all()
        assert key_ids == ["test2"]
    finally:
        await only_new.close()


async def test_a_ciphertext_moved_to_another_row_does_not_open(store):
    from services.common.errors import FailedPrecondition
    from services.session.model import NewMessage, NewSession, Role

    await store.create_session(NewSession(TENANT, "u", "m", session_id="moved"))
    await store.append(
        TENANT, "moved", [NewMessage(int(Role.USER), "first"), NewMessage(int(Role.USER), "second")]
    )
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE messages SET content_enc = (SELECT content_enc FROM messages WHERE seq = 1) "
                "WHERE seq = 2"
            )
        )
    try:
        await store.history(TENANT, "moved", 0, 10)
    except FailedPrecondition as exc:
        assert "stored message 2 cannot be decrypted" in str(exc)
    else:
        raise AssertionError("a ciphertext moved to another seq opened")
