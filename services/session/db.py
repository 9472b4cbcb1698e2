"""Engines for SQLite and Postgres with bounded waits, and database errors mapped to domain errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.common.errors import Aborted, Unavailable
from services.session.metrics import BACKEND_ERRORS

logger = logging.getLogger(__name__)

SQLITE_FILE = "session.db"
# Execution option naming how a SQLite transaction begins ("IMMEDIATE" for writers).
SQLITE_BEGIN = "sqlite_begin"


def resolve_url(database_url: str, state_dir: str | Path) -> str:
    """The async SQLAlchemy URL to use; empty means a SQLite file under state_dir (created)."""
    if not database_url:
        folder = Path(state_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{folder / SQLITE_FILE}"
    url = make_url(database_url)
    # SQLAlchemy no longer knows the "postgres" alias that many tools print.
    if url.get_backend_name() in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+asyncpg")
    elif url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    return url.render_as_string(hide_password=False)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    timeout_s: float = 5.0,
    statement_timeout: bool = True,
) -> AsyncEngine:
    """An async engine whose every wait is bounded by `timeout_s`.

    `statement_timeout=False` leaves statements unbounded (migrations may be long)
    while connecting stays bounded.
    """
    url = make_url(database_url)
    common: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": timeout_s}
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ValueError("the session store needs a SQLite file, not an in-memory database")
        engine = create_async_engine(url, connect_args={"timeout": timeout_s}, **common)
        _setup_sqlite(engine, busy_timeout_ms=int(timeout_s * 1000))
        return engine
    connect_args: dict[str, Any] = {
        "timeout": timeout_s,
        "server_settings": {"application_name": "infermesh-session"},
    }
    if statement_timeout:
        connect_args["command_timeout"] = timeout_s
    # No pre-ping: it would add a round trip to every call, doubling an append's. A connection
    # that died with a database restart fails its call with UNAVAILABLE (clients retry), and
    # SQLAlchemy then renews every connection of the pool at once.
    return create_async_engine(url, connect_args=connect_args, **common)


def _setup_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver so that reads run in real transactions
        # and writers can ask for BEGIN IMMEDIATE (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the one writer; the busy timeout makes
        # writers queue for the lock instead of failing at once.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that
        # reads and then writes can fail with SQLITE_BUSY instead of waiting.
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


@contextlib.contextmanager
def db_errors() -> Iterator[None]:
    """Turn database failures into domain errors: never INTERNAL for an outage."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        raise Aborted("the write conflicted with a concurrent one; retry") from exc
    except (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        OSError,
        TimeoutError,
    ) as exc:
        BACKEND_ERRORS.labels("database", type(exc).__name__).inc()
        logger.warning("database unavailable: %s", describe(exc))
        raise Unavailable("session database unavailable; retry later") from exc
    except sa_exc.DBAPIError as exc:
        if not exc.connection_invalidated and not _server_going_away(exc):
            raise
        BACKEND_ERRORS.labels("database", type(exc).__name__).inc()
        logger.warning("database connection lost: %s", describe(exc))
        raise Unavailable("session database connection lost; retry later") from exc


# SQLSTATE classes of a server that is starting, shutting down or unreachable: 08 connection
# exception, 57 operator intervention (57P01 admin shutdown, 57P03 "the database system is
# starting up", ...). Reported as errors of their own rather than as lost connections.
_GOING_AWAY_CLASSES = ("08", "57")


def _server_going_away(exc: sa_exc.DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    return sqlstate[:2] in _GOING_AWAY_CLASSES


def describe(exc: BaseException) -> str:
    """Exception type and message for logs (database errors carry no message content)."""
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    return f"{type(orig).__name__}: {orig}"
