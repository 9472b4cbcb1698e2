"""Append in one Postgres statement, when the session's last_seq is known beforehand.

The content is sealed with its seq as associated data, so seqs must be known
before the row is written. The caller predicts last_seq (from its last look at
the session) and seals the messages as last_seq + 1, + 2...; one statement then

- bumps `sessions.last_seq` only if it still equals the prediction and none of the
  client message ids is stored yet. That UPDATE locks the session row, and under
  READ COMMITTED Postgres re-checks `last_seq = prediction` on the newest row
  version after waiting for a concurrent writer, so two appends never get the same
  seq;
- inserts the messages only if the UPDATE matched;
- returns the session's last_seq and any stored messages sharing a client id.

Autocommit makes it one round trip. When the UPDATE matched, no append committed
between the statement's snapshot and the lock (last_seq only grows), so the
client-id check read from that snapshot is exact. When it did not match, the
caller falls back to the ordinary locking transaction. UNIQUE(session_pk, seq)
and UNIQUE(session_pk, client_msg_id) stay the last guard either way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

# $1 tenant, $2 session id, $3 predicted last_seq, $4 client ids to look for, $5 message
# count, $6 now, $7.. one array per column of the new messages.
APPEND_SQL = """
WITH cur AS (
    SELECT pk, last_seq FROM sessions WHERE tenant = $1 AND id = $2
), dup AS (
    SELECT m.seq, m.role, m.content, m.client_msg_id, m.token_count, m.created_at, m.key_id,
           m.content_enc
    FROM messages m JOIN cur ON m.session_pk = cur.pk
    WHERE m.client_msg_id = ANY($4::varchar[])
), upd AS (
    UPDATE sessions s SET last_seq = $3::bigint + $5::bigint, updated_at = $6::timestamptz
    FROM cur
    WHERE s.pk = cur.pk AND s.last_seq = $3::bigint AND NOT EXISTS (SELECT 1 FROM dup)
    RETURNING s.pk
), ins AS (
    INSERT INTO messages (session_pk, seq, client_msg_id, role, content, token_count,
                          created_at, key_id, content_enc)
    SELECT upd.pk, $3::bigint + v.ord, v.cid, v.role, v.content, v.tokens, $6::timestamptz,
           v.key_id, v.enc
    FROM upd CROSS JOIN unnest($7::varchar[], $8::smallint[], $9::text[], $10::int[],
                               $11::varchar[], $12::bytea[])
         WITH ORDINALITY AS v(cid, role, content, tokens, key_id, enc, ord)
    RETURNING 1
)
SELECT false AS dup, cur.last_seq AS seq, (SELECT count(*) FROM ins)::smallint AS role,
       NULL::text AS content, NULL::varchar AS client_msg_id, NULL::int AS token_count,
       NULL::timestamptz AS created_at, NULL::varchar AS key_id, NULL::bytea AS content_enc
FROM cur
UNION ALL
SELECT true, seq, role, content, client_msg_id, token_count, created_at, key_id, content_enc
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
class Outcome:
    """What the statement found: `found` False means no such session."""

    found: bool
    # The session's last_seq in the statement's snapshot (before this append).
    last_seq: int
    inserted: bool
    # Stored rows sharing a client id with the append (columns as in the messages table).
    duplicates: list[Any]


def parameters(
    tenant: str, session_id: str, predicted: int, rows: Sequence[Row], now: dt.datetime
) -> tuple[Any, ...]:
    client_ids = [r.client_msg_id for r in rows if r.client_msg_id]
    return (
        tenant,
        session_id,
        predicted,
        client_ids,
        len(rows),
        now,
        [r.client_msg_id for r in rows],
        [r.role for r in rows],
        [r.content for r in rows],
        [r.token_count for r in rows],
        [r.key_id for r in rows],
        [r.content_enc for r in rows],
    )


def outcome(result_rows: Sequence[Any]) -> Outcome:
    head = [r for r in result_rows if not r.dup]
    if not head:
        return Outcome(False, 0, False, [])
    return Outcome(True, head[0].seq, head[0].role > 0, [r for r in result_rows if r.dup])


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
