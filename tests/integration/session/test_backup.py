"""scripts/backup.py (`make backup`, `make restore`): a backup restored into an empty database
holds every row as it was (messages still sealed, readable with the same keys), a non-empty
target is refused unless `clean`, and each failure names what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from infermesh.common.v1 import common_pb2
from scripts import backup
from services.session import db
from services.session.crypto import KeyRing
from services.session.model import NewMessage, NewSession
from services.session.sql_store import SqlStore
from services.session.tables import messages, sessions
from tests.fixtures.databases import temporary_database
from tests.integration.session.conftest import TEST_KEYS

TEXTS = ["hello", "héllo wörld ✓ 你好 🙂", "line\nbreak\ttab \\ 'quote' \"dq\"", "x" * 900]


async def rows(url: str) -> list[tuple[Any, ...]]:
    """Every row of sessions and messages, in key order, ciphertext and all."""
    engine = db.create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            found = list(await conn.execute(sa.select(sessions).order_by(sessions.c.pk)))
            found += list(
                await conn.execute(sa.select(messages).order_by(messages.c.session_pk, messages.c.seq))
            )
        return [tuple(r) for r in found]
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def empty_target(request: pytest.FixtureRequest, source_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of the same kind as `source_url`."""
    if make_url(source_url).get_backend_name() == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'restored' / 'session.db'}"
        return
    async with temporary_database(request.getfixturevalue("postgres_server_url")) as url:
        yield url


async def test_a_backup_restores_every_row(
    store: SqlStore, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    created = await store.create_session(NewSession("t", "u", "m"))
    sent = [
        NewMessage(role=common_pb2.ROLE_USER, content=text, client_msg_id=f"c{i}")
        for i, text in enumerate(TEXTS)
    ]
    await store.append("t", created.session_id, sent)

    dump = await asyncio.to_thread(backup.backup, make_url(database_url), tmp_path / "backups")
    sqlite = make_url(database_url).get_backend_name() == "sqlite"
    assert dump.parent == tmp_path / "backups" and dump.name.startswith("session-")
    assert dump.suffix == (".sqlite" if sqlite else ".dump")
    assert list(dump.parent.iterdir()) == [dump]  # no partial file left behind

    async with empty_target(request, database_url, tmp_path) as target:
        if sqlite:
            (tmp_path / "restored").mkdir()
        await asyncio.to_thread(backup.restore, make_url(target), dump)
        assert await rows(target) == await rows(database_url)
        restored = SqlStore.from_url(target, pool_size=1, keys=KeyRing.parse(TEST_KEYS))
        try:
            page = await restored.history("t", created.session_id, 0, 100)
        finally:
            await restored.close()
        assert [m.content for m in page.messages] == TEXTS
        assert [m.seq for m in page.messages] == list(range(1, len(TEXTS) + 1))

        # A second restore into the same (now full) database is refused, naming the way out...
        with pytest.raises(backup.BackupError, match="--clean"):
            await asyncio.to_thread(backup.restore, make_url(target), dump)
        # ...which replaces what it holds.
        await store.append("t", created.session_id, [NewMessage(role=common_pb2.ROLE_USER, content="later")])
        await asyncio.to_thread(functools.partial(backup.restore, make_url(target), dump, clean=True))
        assert len(await rows(target)) == 1 + len(TEXTS)


def test_errors_name_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = make_url(f"sqlite+aiosqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(backup.BackupError, match=r"no SQLite database at .*none\.db.*database_url"):
        backup.backup(missing, tmp_path / "b")
    with pytest.raises(backup.BackupError, match="no backup file"):
        backup.restore(missing, tmp_path / "nothing.sqlite")

    closed = make_url("postgresql+asyncpg://u:secret@127.0.0.1:1/db")
    with pytest.raises(backup.BackupError, match=r"cannot reach Postgres 127\.0\.0\.1:1/db") as caught:
        backup.backup(closed, tmp_path / "b")
    assert "secret" not in str(caught.value)
    with pytest.raises(backup.BackupError, match="names no database"):
        backup.backup(make_url("postgresql://u@127.0.0.1:1"), tmp_path / "b")

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(backup.BackupError, match="pg_dump is not on PATH"):
        backup.backup(closed, tmp_path / "b")


def test_the_password_goes_in_the_environment_not_the_command_line() -> None:
    dsn, env = backup.libpq(make_url("postgresql+asyncpg://u:p%40ss@db.internal:6543/sessions?ssl=require"))
    assert dsn == "postgresql://u@db.internal:6543/sessions?sslmode=require"
    assert env["PGPASSWORD"] == "p@ss"


def test_the_command_line_reports_a_failure_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INFERMESH_SESSION_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("INFERMESH_SESSION_DATABASE_URL", "")
    assert backup.main(["backup", "--dir", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err.startswith("backup: no SQLite database at")
