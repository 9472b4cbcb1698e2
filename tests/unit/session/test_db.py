"""Database URLs and the mapping of database failures to domain errors."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc

from services.common.errors import Aborted, Unavailable
from services.session import db


def test_empty_url_means_sqlite_under_the_state_dir(tmp_path):
    state = tmp_path / "state" / "nested"
    url = db.resolve_url("", state)
    assert url == f"sqlite+aiosqlite:///{state / 'session.db'}"
    assert state.is_dir()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p%40ss@h:5/d", "postgresql+asyncpg://u:p%40ss@h:5/d"),
        ("postgres://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_urls_get_the_async_driver(given, expected, tmp_path):
    assert db.resolve_url(given, tmp_path) == expected


def test_in_memory_sqlite_is_refused():
    with pytest.raises(ValueError, match="SQLite file"):
        db.create_engine("sqlite+aiosqlite://")


def operational() -> Exception:
    return sa_exc.OperationalError("SELECT 1", {}, OSError("connection refused"))


class DriverError(Exception):
    """A driver error carrying its SQLSTATE, as asyncpg's do."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def with_sqlstate(sqlstate: str) -> Exception:
    return sa_exc.DBAPIError("SELECT 1", {}, DriverError(sqlstate))


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (operational(), Unavailable),
        (ConnectionRefusedError(), Unavailable),
        (TimeoutError(), Unavailable),
        (sa_exc.TimeoutError("pool"), Unavailable),
        (sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True), Unavailable),
        (sa_exc.IntegrityError("INSERT", {}, Exception("duplicate")), Aborted),
        # The database system is starting up / shutting down (a restart), a connection failure.
        (with_sqlstate("57P03"), Unavailable),
        (with_sqlstate("57P01"), Unavailable),
        (with_sqlstate("08006"), Unavailable),
    ],
)
def test_database_failures_become_domain_errors(raised, expected):
    with pytest.raises(expected), db.db_errors():
        raise raised


def test_programming_errors_are_not_hidden():
    with pytest.raises(sa_exc.ProgrammingError), db.db_errors():
        raise sa_exc.ProgrammingError("SELEC 1", {}, Exception("syntax"))
    with pytest.raises(sa_exc.DBAPIError), db.db_errors():
        raise with_sqlstate("42601")
