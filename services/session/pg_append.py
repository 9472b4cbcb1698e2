"""Append in one Postgres statement, when the session's last_seq is known beforehand.

The content is sealed with its seq as associated data, so seqs must be known
before the row is written. The caller predicts last_seq (from its last look at
the session) and seals the messages as last_seq + 1, + 2...; one statement then

- locks the session row if its last_seq still equals the prediction and none of the
  client message ids is stored yet (under READ COMMITTED Postgres re-checks
  `last_seq = prediction` on the newest row version after waiting for a concurrent
  writer), and bumps last_seq, so two appends never get the same seq;
- inserts the messages only if the UPDATE matched;
- returns the session's last_seq and any stored messages sharing a client id.

Appends to several sessions arriving together share one statement (`Batcher`); their
rows are locked in primary-key order, so two such statements (of two replicas, say)
cannot deadlock. Autocommit makes it one round trip. When the UPDATE matched, no append committed
between the statement's snapshot and the lock (last_seq only grows), so the
client-id check read from that snapshot is exact. When it did not match, the
caller falls back to the ordinary locking transaction. UNIQUE(session_pk, seq)
and UNIQUE(session_pk, client_msg_id) stay the last guard either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# Several appends (to distinct sessions) in one statement: $1.. one array per append
# (tenant, session id, predicted last_seq, message count, time), $6.. one array per message
# column (k = which append, 1-based; i = position in it, 1-based).
APPEND_SQL = """
WITH a AS (
    SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::bigint[], $4::bigint[], $5::timestamptz[])
        WITH ORDINALITY AS a(tenant, id, pred, n, at, k)
), cur AS (
    SELECT a.k, s.pk, s.last_seq FROM a JOIN sessions s ON s.tenant = a.tenant AND s.id = a.id
), m AS (
    SELECT * FROM unnest($6::bigint[], $7::varchar[], $8::smallint[], $9::text[], $10::int[],
                         $11::varchar[], $12::bytea[], $13::bigint[])
        AS m(k, cid, role, content, tokens, key_id, enc, i)
), dup AS (
    SELECT cur.k, x.seq, x.role, x.content, x.client_msg_id, x.token_count, x.created_at,
           x.key_id, x.content_enc
    FROM m JOIN cur ON cur.k = m.k
         JOIN messages x ON x.session_pk = cur.pk AND x.client_msg_id = m.cid
), locked AS MATERIALIZED (
    SELECT s.pk, a.k FROM sessions s JOIN cur ON cur.pk = s.pk JOIN a ON a.k = cur.k
    WHERE s.last_seq = a.pred AND NOT EXISTS (SELECT 1 FROM dup WHERE dup.k = a.k)
    ORDER BY s.pk
    FOR UPDATE OF s
), upd AS (
    UPDATE sessions s SET last_seq = a.pred + a.n, updated_at = a.at
    FROM locked JOIN a ON a.k = locked.k
    WHERE s.pk = locked.pk AND s.last_seq = a.pred
    RETURNING s.pk, a.k, a.pred, a.at
), ins AS (
    INSERT INTO messages (session_pk, seq, client_msg_id, role, content, token_count,
                          created_at, key_id, content_enc)
    SELECT upd.pk, upd.pred + m.i, m.cid, m.role, m.content, m.tokens, upd.at, m.key_id, m.enc
    FROM upd JOIN m ON m.k = upd.k
    RETURNING session_pk
)
SELECT false AS dup, cur.k, cur.last_seq AS seq,
       (SELECT count(*) FROM ins WHERE ins.session_pk = cur.pk)::smallint AS role,
       NULL::text AS content, NULL::varchar AS client_msg_id, NULL::int AS token_count,
       NULL::timestamptz AS created_at, NULL::varchar AS key_id, NULL::bytea AS content_enc
FROM cur
UNION ALL
SELECT true, k, seq, role, content, client_msg_id, token_count, created_at, key_id, content_enc
FROM dup
"""


@dataclasses.dataclass(frozen=True)
class Row:
    """A new message as its column values (content sealed or not, as the store decides)."""

    client_msg_id: str | None
    role: int
    content: str | None
    token_count: int
    key_id: str | None
    content_enc: bytes | None


@dataclasses.dataclass(frozen=True)
class Append:
    """One append as the statement takes it: seqs predicted + 1, + 2... for its rows."""

    tenant: str
    session_id: str
    predicted: int
    rows: Sequence[Row]
    # created_at of the messages and the session's updated_at.
    at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the statement found for one append: `found` False means no such session."""

    found: bool
    # The session's last_seq in the statement's snapshot (before this append).
    last_seq: int
    inserted: bool
    # Stored rows sharing a client id with the append (columns as in the messages table).
    duplicates: list[Any]


def parameters(appends: Sequence[Append]) -> tuple[Any, ...]:
    rows = [(k, i, r) for k, a in enumerate(appends, start=1) for i, r in enumerate(a.rows, start=1)]
    return (
        [a.tenant for a in appends],
        [a.session_id for a in appends],
        [a.predicted for a in appends],
        [len(a.rows) for a in appends],
        [a.at for a in appends],
        [k for k, _, _ in rows],
        [r.client_msg_id for _, _, r in rows],
        [r.role for _, _, r in rows],
        [r.content for _, _, r in rows],
        [r.token_count for _, _, r in rows],
        [r.key_id for _, _, r in rows],
        [r.content_enc for _, _, r in rows],
        [i for _, i, _ in rows],
    )


def outcomes(result_rows: Sequence[Any], count: int) -> list[Outcome]:
    """The statement's rows for `count` appends, as one Outcome each (in order)."""
    head = {r.k: r for r in result_rows if not r.dup}
    dups: dict[int, list[Any]] = {}
    for r in result_rows:
        if r.dup:
            dups.setdefault(r.k, []).append(r)
    out = []
    for k in range(1, count + 1):
        row = head.get(k)
        if row is None:
            out.append(Outcome(False, 0, False, []))
        else:
            out.append(Outcome(True, row.seq, row.role > 0, dups.get(k, [])))
    return out


class LastSeqs:
    """The last_seq last seen per session (bounded, least recently used dropped): predictions
    for the one-statement append. A wrong one costs a fallback, never correctness."""

    def __init__(self, max_sessions: int = 100_000) -> None:
        self._max = max_sessions
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    def get(self, tenant: str, session_id: str) -> int | None:
        return self._seen.get((tenant, session_id))

    def saw(self, tenant: str, session_id: str, last_seq: int) -> None:
        key = (tenant, session_id)
        self._seen[key] = last_seq
        self._seen.move_to_end(key)
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def forget(self, tenant: str, session_id: str) -> None:
        self._seen.pop((tenant, session_id), None)


class Batcher(Generic[ItemT, ResultT]):
    """Runs items in batches: at most `slots` batches at once, each of up to `max_batch` items
    with distinct keys. An item that arrives while every slot is busy waits for the next batch,
    so under load many appends share one statement (and one commit), and alone an item runs at
    once. `run` returns one result per item, in order; if it raises, every item of the batch
    gets the error. A caller that goes away does not cancel its batch (others share it)."""

    def __init__(
        self,
        run: Callable[[list[ItemT]], Awaitable[list[ResultT]]],
        key: Callable[[ItemT], Hashable],
        *,
        slots: int,
        max_batch: int,
    ) -> None:
        self._run = run
        self._key = key
        self._slots = slots
        self._max_batch = max_batch
        self._busy = 0
        self._queue: deque[tuple[ItemT, asyncio.Future[ResultT]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: ItemT) -> ResultT:
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._busy < self._slots:
            self._busy += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    def _take(self) -> list[tuple[ItemT, asyncio.Future[ResultT]]]:
        batch: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        keys: set[Hashable] = set()
        later: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        while self._queue and len(batch) < self._max_batch:
            entry = self._queue.popleft()
            key = self._key(entry[0])
            (later if key in keys else batch).append(entry)
            keys.add(key)
        self._queue.extendleft(reversed(later))
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._busy -= 1
