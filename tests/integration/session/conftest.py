"""Session service fixtures: every test runs on SQLite and on real Postgres (marker `postgres`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from infermesh.session.v1 import session_pb2_grpc
from services.common.config import load_config
from services.session import migrate
from services.session.config import SessionConfig
from services.session.crypto import KeyRing
from services.session.server import SessionServer, create_server
from services.session.sql_store import SqlStore

# One key for the whole test session, so tests never write a key file of their own.
TEST_KEYS = KeyRing.new_entry("test1")
# Small limits so that the tests can cross them cheaply.
TEST_LIMITS = {
    "max_message_chars": 1000,
    "max_messages_per_append": 64,
    "default_page_size": 10,
    "max_page_size": 50,
}


def session_config(database_url: str, **overrides: Any) -> SessionConfig:
    values = {
        "port": 0,
        "database_url": database_url,
        "db_timeout_s": 5.0,
        "encryption_keys": TEST_KEYS,
        **TEST_LIMITS,
        **overrides,
    }
    return load_config(SessionConfig, "session", env={}, overrides=values)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def migrated_postgres_url(postgres_url: str) -> str:
    await migrate.upgrade(postgres_url)
    return postgres_url


@pytest.fixture
def pg_url(migrated_postgres_url: str, clean_postgres_url: str) -> str:
    """The session's Postgres database, migrated and emptied (for tests that need Postgres itself)."""
    return clean_postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A migrated, empty database: a fresh SQLite file, or the session's Postgres database truncated."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'session.db'}"
    request.getfixturevalue("migrated_postgres_url")
    return str(request.getfixturevalue("clean_postgres_url"))


@pytest_asyncio.fixture(loop_scope="session")
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    await migrate.upgrade(database_url)
    sql_store = SqlStore.from_url(database_url, pool_size=5, timeout_s=5.0, keys=KeyRing.parse(TEST_KEYS))
    yield sql_store
    await sql_store.close()


@pytest_asyncio.fixture(loop_scope="session")
async def server(database_url: str) -> AsyncIterator[SessionServer]:
    srv = await create_server(session_config(database_url))
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def stub(server: SessionServer) -> AsyncIterator[session_pb2_grpc.SessionStoreStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield session_pb2_grpc.SessionStoreStub(channel)
