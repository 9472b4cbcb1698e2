"""SqlStore directly: windows over long histories, atomicity, replicas, stored types."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa

from services.common.errors import Aborted, NotFound
from services.session.model import NewMessage, NewSession, Role
from services.session.sql_store import WINDOW_BATCH, SqlStore
from services.session.window import select_window

TENANT = "acme"


async def new_session(store: SqlStore, session_id: str = "s-1") -> str:
    info = await store.create_session(NewSession(TENANT, "user-1", "m", {"k": "v"}, 7, session_id))
    return info.session_id


async def test_session_round_trip_keeps_types(store):
    sid = await new_session(store)
    info = await store.get_session(TENANT, sid)
    assert info.metadata == {"k": "v"} and info.retention_days == 7 and info.last_seq == 0
    assert info.created_at.tzinfo is not None and info.created_at.utcoffset() == dt.timedelta(0)
    result = await store.append(TENANT, sid, [NewMessage(Role.TOOL, "{}", "", 2)])
    assert result.messages[0].role is Role.TOOL
    assert result.messages[0].created_at.utcoffset() == dt.timedelta(0)
    page = await store.history(TENANT, sid, 0, 10)
    assert page.messages == result.messages


@pytest.mark.parametrize("budget", [1, 5, 299, 300, 301, 700, 1500, 1_000_000])
async def test_window_matches_select_window_over_the_whole_history(store, budget):
    sid = await new_session(store)
    # Longer than one newest-first batch, system prompt not first, a second system message later.
    count = 2 * WINDOW_BATCH + 50
    history = [NewMessage(Role.USER, f"m{i}", "", 1 + i % 3) for i in range(count)]
    history[3] = NewMessage(Role.SYSTEM, "rules", "", 40)
    history[400] = NewMessage(Role.SYSTEM, "later", "", 2)
    await store.append(TENANT, sid, history)

    everything = (await store.history(TENANT, sid, 0, 10_000)).messages
    expected, truncated = select_window(everything, budget)
    window = await store.window(TENANT, sid, budget)
    assert window.messages == expected
    assert window.truncated == truncated
    assert window.last_seq == count
    assert "rules" in [m.content for m in window.messages]


async def test_window_of_an_empty_session(store):
    sid = await new_session(store)
    window = await store.window(TENANT, sid, 100)
    assert (window.messages, window.truncated, window.last_seq) == ([], False, 0)


async def test_append_is_all_or_nothing(store):
    sid = await new_session(store)
    await store.append(TENANT, sid, [NewMessage(Role.USER, "kept", "c-0", 1)])
    # Validation normally refuses the repeated id; here the database must, and roll everything back.
    batch = [NewMessage(Role.USER, "a", "c-1", 1), NewMessage(Role.USER, "b", "c-1", 1)]
    with pytest.raises(Aborted):
        await store.append(TENANT, sid, batch)
    assert [m.content for m in (await store.history(TENANT, sid, 0, 100)).messages] == ["kept"]
    assert (await store.get_session(TENANT, sid)).last_seq == 1


async def test_two_replicas_appending_at_once(store, database_url):
    """Two stores on one database, as two session replicas: seqs stay unique and gap-free."""
    sid = await new_session(store)
    other = SqlStore.from_url(database_url, pool_size=3, timeout_s=5.0, keys=store.keys)
    try:
        replicas = [store, other]

        async def writer(w: int) -> list[int]:
            seqs: list[int] = []
            for i in range(10):
                result = await replicas[w % 2].append(
                    TENANT, sid, [NewMessage(Role.USER, f"{w}-{i}", f"{w}-{i}", 1)]
                )
                seqs.extend(m.seq for m in result.messages)
            return seqs

        results = await asyncio.gather(*(writer(w) for w in range(6)))
    finally:
        await other.close()
    assert sorted(seq for seqs in results for seq in seqs) == list(range(1, 61))


async def test_create_session_race_returns_one_session(store):
    new = NewSession(TENANT, "user-1", "m", {}, 0, "raced")
    results = await asyncio.gather(*(store.create_session(new) for _ in range(8)))
    assert len({r.created_at for r in results}) == 1


async def test_delete_removes_the_messages(store):
    sid = await new_session(store)
    await store.append(TENANT, sid, [NewMessage(Role.USER, "x", "", 1)] * 3)
    await store.delete_session(TENANT, sid)
    with pytest.raises(NotFound):
        await store.get_session(TENANT, sid)
    async with store.engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one() == 0


async def test_sqlite_runs_in_wal_mode(tmp_path):
    from services.session import migrate

    url = f"sqlite+aiosqlite:///{tmp_path / 'wal.db'}"
    await migrate.upgrade(url)
    store = SqlStore.from_url(url)
    try:
        async with store.engine.connect() as conn:
            assert (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await conn.execute(sa.text("PRAGMA busy_timeout"))).scalar_one() == 5000
            assert (await conn.execute(sa.text("PRAGMA foreign_keys"))).scalar_one() == 1
    finally:
        await store.close()
