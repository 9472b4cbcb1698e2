"""The shared database fixtures: throwaway servers, clean databases, clear failures."""

from __future__ import annotations

import asyncpg
import pytest
import redis

from tests.fixtures import databases


@pytest.mark.postgres
async def test_throwaway_postgres_starts_serves_and_stops():
    url, stop = await databases._start_local_postgres()
    try:
        assert await databases._postgres_error(url) is None
        async with databases.temporary_database(url) as db_url:
            assert db_url.startswith("postgresql+asyncpg://") and "infermesh_test_" in db_url
            conn = await asyncpg.connect(databases._asyncpg_dsn(db_url))
            try:
                assert await conn.fetchval("SELECT current_database()") == db_url.rsplit("/", 1)[1]
            finally:
                await conn.close()
    finally:
        stop()
    assert await databases._postgres_error(url) is not None


def test_throwaway_redis_starts_serves_and_stops():
    url, stop = databases._start_local_redis()
    try:
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        stop()
    assert databases._redis_error(url) is not None


@pytest.mark.postgres
async def test_truncate_all_keeps_version_tables(postgres_url):
    conn = await asyncpg.connect(databases._asyncpg_dsn(postgres_url))
    try:
        await conn.execute('CREATE TABLE "fixture probe" (x int)')
        await conn.execute('INSERT INTO "fixture probe" VALUES (1)')
        await conn.execute("CREATE TABLE alembic_version_probe (v text)")
        await conn.execute("INSERT INTO alembic_version_probe VALUES ('1')")
        await databases.truncate_all(postgres_url)
        assert await conn.fetchval('SELECT count(*) FROM "fixture probe"') == 0
        assert await conn.fetchval("SELECT count(*) FROM alembic_version_probe") == 1
    finally:
        await conn.execute('DROP TABLE "fixture probe"')
        await conn.execute("DROP TABLE alembic_version_probe")
        await conn.close()


async def test_no_server_fails_saying_what_was_tried(monkeypatch):
    monkeypatch.delenv(databases.POSTGRES_ENV, raising=False)
    monkeypatch.delenv(databases.REDIS_ENV, raising=False)
    monkeypatch.setattr(databases, "LOCAL_POSTGRES", "postgresql://postgres@127.0.0.1:1/test")
    monkeypatch.setattr(databases, "LOCAL_REDIS", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(databases, "_postgres_bindir", lambda: None)
    monkeypatch.setattr(databases.shutil, "which", lambda name: None)

    with pytest.raises(pytest.fail.Exception) as info:
        await databases._find_postgres()
    message = str(info.value)
    for attempt in (databases.POSTGRES_ENV, "testcontainers", "127.0.0.1:1", "initdb"):
        assert attempt in message

    with pytest.raises(pytest.fail.Exception) as info:
        await databases._find_redis()
    message = str(info.value)
    for attempt in (databases.REDIS_ENV, "testcontainers", "127.0.0.1:1", "redis-server"):
        assert attempt in message


async def test_a_configured_server_that_does_not_answer_fails(monkeypatch):
    monkeypatch.setenv(databases.POSTGRES_ENV, "postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(pytest.fail.Exception, match=databases.POSTGRES_ENV):
        await databases._find_postgres()


def test_redis_url_answers(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
    finally:
        client.close()
