"""Alembic migrations: an empty database upgrades to the models' schema and downgrades to base."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import alembic.config
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.session import migrate
from services.session.db import create_engine
from services.session.tables import metadata

ROOT = Path(__file__).resolve().parents[3]
ALEMBIC_INI = ROOT / "services" / "session" / "alembic.ini"
# The newest revision: every upgrade in these tests should reach it.
HEAD = "0004"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("empty_postgres_url"))


async def inspect(url: str, probe: Any) -> Any:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(probe)
    finally:
        await engine.dispose()


def table_names(conn: sa.Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


async def test_upgrade_builds_the_schema_of_the_models(empty_url):
    assert await migrate.current(empty_url) is None
    assert await inspect(empty_url, table_names) == set()

    await migrate.upgrade(empty_url)
    assert await migrate.current(empty_url) == HEAD
    assert await inspect(empty_url, table_names) == {
        "sessions",
        "messages",
        "api_keys",
        "audit_log",
        migrate.VERSION_TABLE,
    }

    def schema_diff(conn: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": migrate.VERSION_TABLE}
        )
        return compare_metadata(context, metadata)

    assert await inspect(empty_url, schema_diff) == []

    def constraints(conn: sa.Connection) -> tuple[Any, ...]:
        insp = sa.inspect(conn)
        return (
            insp.get_pk_constraint("messages")["constrained_columns"],
            sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints("messages")),
            sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints("sessions")),
            [fk["options"].get("ondelete") for fk in insp.get_foreign_keys("messages")],
        )

    assert await inspect(empty_url, constraints) == (
        ["session_pk", "seq"],
        [("session_pk", "client_msg_id")],
        [("tenant", "id")],
        ["CASCADE"],
    )
    # Running it again (every start with auto_migrate) changes nothing.
    await migrate.upgrade(empty_url)
    assert await migrate.current(empty_url) == HEAD


async def test_alembic_downgrade_base_and_back(empty_url):
    await migrate.upgrade(empty_url)
    # The alembic CLI itself; in a thread because its env.py runs its own event loop.
    argv = ["-c", str(ALEMBIC_INI), "-x", f"url={empty_url}", "downgrade", "base"]
    await asyncio.to_thread(alembic.config.main, argv=argv)
    assert await inspect(empty_url, table_names) == {migrate.VERSION_TABLE}
    assert await migrate.current(empty_url) is None

    await migrate.upgrade(empty_url)
    assert await inspect(empty_url, table_names) == {
        "sessions",
        "messages",
        "api_keys",
        "audit_log",
        migrate.VERSION_TABLE,
    }


async def test_migrate_command_creates_the_embedded_database(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_")}
    env["INFERMESH_SESSION_STATE_DIR"] = str(tmp_path / "state")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.session",
        "migrate",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, output.decode()
    db_file = tmp_path / "state" / "session.db"
    assert db_file.exists()
    assert await migrate.current(f"sqlite+aiosqlite:///{db_file}") == HEAD


async def test_rows_from_before_encryption_survive_the_upgrade_and_are_sealed_by_rotation(empty_url):
    from services.session.crypto import KeyRing
    from services.session.model import NewMessage, Role
    from services.session.sql_store import SqlStore

    await migrate.upgrade(empty_url, "0001")
    engine = create_engine(empty_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO sessions (pk, id, tenant, user_id, model, created_at, updated_at, "
                    "metadata, last_seq, retention_days) VALUES (1, 's', 'acme', 'u', 'm', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, '{}', 1, 0)"
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO messages (session_pk, seq, role, content, token_count, created_at) "
                    "VALUES (1, 1, 2, 'written in plaintext', 5, CURRENT_TIMESTAMP)"
                )
            )
    finally:
        await engine.dispose()
    await migrate.upgrade(empty_url)
    store = SqlStore.from_url(empty_url, keys=KeyRing.parse(KeyRing.new_entry("k1")))
    try:
        await store.append("acme", "s", [NewMessage(int(Role.ASSISTANT), "sealed from the start")])
        assert await store.rotate_keys() == 1
        page = await store.history("acme", "s", 0, 10)
        assert [m.content for m in page.messages] == ["written in plaintext", "sealed from the start"]
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT content, key_id FROM messages"))).all()
        assert rows == [(None, "k1"), (None, "k1")]
    finally:
        await store.close()
