"""Alembic environment: on a connection handed over by services.session.migrate, or on its own.

Standalone (the `alembic` CLI) the URL comes from `-x url=...`, else from the
session service's configuration (file and INFERMESH_SESSION_* environment).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from services.session import db
from services.session.migrate import VERSION_TABLE
from services.session.tables import metadata

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=False,
        compare_type=True,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.attributes.get("database_url")
    if url:
        return db.resolve_url(url, ".run")
    from services.common.config import load_config
    from services.session.config import SessionConfig

    cfg = load_config(SessionConfig, "session")
    return db.resolve_url(cfg.database_url, cfg.state_dir)


def _run_on(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    engine = db.create_engine(_url(), pool_size=1, statement_timeout=False)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run_on)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    _run_on(shared)
else:
    asyncio.run(_run_standalone())
