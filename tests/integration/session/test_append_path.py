"""The one-statement append on Postgres: one round trip when last_seq is known, the locking
transaction when the prediction is stale, and the same answers either way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import event

from services.common.errors import Aborted, AlreadyExists, NotFound
from services.session.crypto import KeyRing
from services.session.model import NewMessage, NewSession, Role
from services.session.sql_store import SqlStore

from .conftest import TEST_KEYS

pytestmark = pytest.mark.postgres

TENANT = "acme"


@pytest_asyncio.fixture(loop_scope="session")
async def pg_store(pg_url: str) -> AsyncIterator[SqlStore]:
    store = SqlStore.from_url(pg_url, pool_size=4, keys=KeyRing.parse(TEST_KEYS))
    yield store
    await store.close()


@contextmanager
def statements(store: SqlStore) -> Iterator[list[str]]:
    """The SQL statements (and transaction starts) the store sends while the block runs."""
    sent: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    def on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            sent.append("BEGIN")

    engine = store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "begin", on_begin)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "begin", on_begin)


def user(content: str, client_msg_id: str = "") -> NewMessage:
    return NewMessage(Role.USER, content, client_msg_id, 1)


async def session(store: SqlStore, session_id: str = "s-1") -> str:
    return (await store.create_session(NewSession(TENANT, "user-1", "m", {}, 0, session_id))).session_id


async def contents(store: SqlStore, sid: str) -> list[tuple[int, str]]:
    return [(m.seq, m.content) for m in (await store.history(TENANT, sid, 0, 1000)).messages]


async def test_an_append_to_a_known_session_is_one_statement_outside_a_transaction(pg_store):
    sid = await session(pg_store)
    with statements(pg_store) as sent:
        result = await pg_store.append(TENANT, sid, [user("a", "c-1"), user("b", "c-2")])
    assert len(sent) == 1, sent
    assert [m.seq for m in result.messages] == [1, 2] and result.last_seq == 2
    with statements(pg_store) as sent:
        retried = await pg_store.append(TENANT, sid, [user("a", "c-1"), user("b", "c-2")])
    assert len(sent) == 1, sent
    assert retried == result
    assert await contents(pg_store, sid) == [(1, "a"), (2, "b")]


async def test_a_stale_prediction_takes_the_locking_path_and_learns(pg_store, pg_url):
    sid = await session(pg_store)
    other = SqlStore.from_url(pg_url, pool_size=2, keys=pg_store.keys)
    try:
        await other.append(TENANT, sid, [user("from the other replica")])
        with statements(pg_store) as sent:
            result = await pg_store.append(TENANT, sid, [user("here")])
        assert "BEGIN" in sent
        assert result.last_seq == 2 and result.messages[0].seq == 2
        with statements(pg_store) as sent:
            await pg_store.append(TENANT, sid, [user("again")])
        assert len(sent) == 1
    finally:
        await other.close()
    assert await contents(pg_store, sid) == [(1, "from the other replica"), (2, "here"), (3, "again")]


async def test_retries_and_reused_ids_answer_as_on_the_locking_path(pg_store):
    sid = await session(pg_store)
    first = await pg_store.append(TENANT, sid, [user("a", "c-1")])
    # Partly a retry: only the new message is written.
    mixed = await pg_store.append(TENANT, sid, [user("a", "c-1"), user("b", "c-2")])
    assert [m.seq for m in mixed.messages] == [1, 2] and mixed.messages[0] == first.messages[0]
    with pytest.raises(AlreadyExists, match="c-1"):
        await pg_store.append(TENANT, sid, [user("other content", "c-1")])
    assert await contents(pg_store, sid) == [(1, "a"), (2, "b")]


async def test_expected_last_seq_on_the_one_statement_path(pg_store):
    sid = await session(pg_store)
    await pg_store.append(TENANT, sid, [user("a")], expected_last_seq=0)
    with pytest.raises(Aborted, match="expected_last_seq=0 but the session is at 1"):
        await pg_store.append(TENANT, sid, [user("b")], expected_last_seq=0)
    # A retry of the append that did commit still returns the original, whatever it expected.
    done = await pg_store.append(TENANT, sid, [user("c", "c-3")], expected_last_seq=1)
    assert (await pg_store.append(TENANT, sid, [user("c", "c-3")], expected_last_seq=1)) == done
    assert await contents(pg_store, sid) == [(1, "a"), (2, "c")]


async def test_unknown_and_deleted_sessions_are_not_found(pg_store):
    pg_store.last_seqs.saw(TENANT, "never-created", 0)
    with pytest.raises(NotFound):
        await pg_store.append(TENANT, "never-created", [user("x")])
    sid = await session(pg_store, "s-gone")
    await pg_store.append(TENANT, sid, [user("x")])
    await pg_store.delete_session(TENANT, sid)
    with pytest.raises(NotFound):
        await pg_store.append(TENANT, sid, [user("y")])
    # Created again under the same id: numbering starts over, not after the old last_seq.
    await session(pg_store, "s-gone")
    assert (await pg_store.append(TENANT, sid, [user("z")])).last_seq == 1


async def test_writers_racing_on_one_session_through_two_replicas_get_one_gap_free_order(pg_store, pg_url):
    sid = await session(pg_store)
    other = SqlStore.from_url(pg_url, pool_size=4, keys=pg_store.keys)
    try:
        replicas = [pg_store, other]

        async def writer(w: int) -> list[tuple[int, str]]:
            out = []
            for i in range(8):
                message = user(f"{w}-{i}", f"{w}-{i}")
                result = await replicas[w % 2].append(TENANT, sid, [message])
                out.append((result.messages[0].seq, result.messages[0].content))
            return out

        acked = [pair for pairs in await asyncio.gather(*(writer(w) for w in range(8))) for pair in pairs]
    finally:
        await other.close()
    stored = await contents(pg_store, sid)
    assert [seq for seq, _ in stored] == list(range(1, 65))
    assert sorted(acked) == stored


async def test_appends_arriving_together_share_statements_without_deadlocks_between_replicas(
    pg_store, pg_url
):
    """Two replicas, each with many writers over the same sessions in different orders: their
    batched statements lock rows in one order, so nothing fails, and every session stays gap-free."""
    sids = [await session(pg_store, f"s-{n}") for n in range(6)]
    other = SqlStore.from_url(pg_url, pool_size=4, keys=pg_store.keys)
    try:
        for sid in sids:
            other.last_seqs.saw(TENANT, sid, 0)

        async def writer(w: int) -> list[tuple[str, int, str]]:
            replica = (pg_store, other)[w % 2]
            acked = []
            for i in range(6):
                # Each writer walks the sessions in its own order.
                sid = sids[(w * 5 + i * (1 + w % 3)) % len(sids)]
                result = await replica.append(TENANT, sid, [user(f"{w}-{i}", f"{w}-{i}")])
                acked.append((sid, result.messages[0].seq, f"{w}-{i}"))
            return acked

        with statements(pg_store) as sent:
            acked = [a for batch in await asyncio.gather(*(writer(w) for w in range(24))) for a in batch]
    finally:
        await other.close()
    for sid in sids:
        stored = await contents(pg_store, sid)
        assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
        assert sorted((seq, text) for s, seq, text in acked if s == sid) == stored
    # Fewer statements than appends on this replica: they were shared.
    assert len(acked) == 144 and len([s for s in sent if "WITH a AS" in s]) < 72
