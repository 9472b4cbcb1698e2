"""Run the session schema migrations (Alembic) from code, the CLI or at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from services.session import db

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Its own version table, so other services' migrations can share the database.
VERSION_TABLE = "alembic_version_session"
# Postgres advisory lock key: replicas starting together migrate one at a time.
MIGRATION_LOCK_KEY = 0x5E5510


def alembic_config(database_url: str = "") -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Kept out of the ini options: configparser would choke on '%' in passwords.
    cfg.attributes["database_url"] = database_url
    return cfg


async def upgrade(database_url: str, revision: str = "head", *, timeout_s: float = 10.0) -> None:
    """Bring the database at `database_url` up to `revision`."""
    await _run(database_url, timeout_s, command.upgrade, revision)


async def downgrade(database_url: str, revision: str, *, timeout_s: float = 10.0) -> None:
    await _run(database_url, timeout_s, command.downgrade, revision)


async def current(database_url: str, *, timeout_s: float = 10.0) -> str | None:
    """The revision the database is at, None when unmigrated."""
    from alembic.runtime.migration import MigrationContext

    engine = db.create_engine(database_url, pool_size=1, timeout_s=timeout_s, statement_timeout=False)
    try:
        with db.db_errors():
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: MigrationContext.configure(
                        sync, opts={"version_table": VERSION_TABLE}
                    ).get_current_revision()
                )
    finally:
        await engine.dispose()


def head() -> str | None:
    """The newest revision of the migrations shipped with this code."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def _run(database_url: str, timeout_s: float, action: Any, revision: str) -> None:
    engine = db.create_engine(database_url, pool_size=1, timeout_s=timeout_s, statement_timeout=False)
    try:
        with db.db_errors():
            async with engine.connect() as conn:
                if db.is_sqlite(engine):
                    conn = await conn.execution_options(**{db.SQLITE_BEGIN: "IMMEDIATE"})
                async with conn.begin():
                    await conn.run_sync(_run_sync, action, revision)
    finally:
        await engine.dispose()


def _run_sync(connection: Connection, action: Any, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    cfg = alembic_config()
    # env.py runs on this connection, inside this transaction.
    cfg.attributes["connection"] = connection
    action(cfg, revision)
