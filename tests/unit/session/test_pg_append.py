"""The pure parts of the one-statement append: predictions, parameters, the statement's answer."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from services.session.pg_append import LastSeqs, Row, outcome, parameters


def test_last_seqs_keep_the_most_recently_seen_sessions():
    seen = LastSeqs(max_sessions=2)
    seen.saw("t", "a", 1)
    seen.saw("t", "b", 2)
    seen.saw("t", "a", 3)  # a is now the most recent
    seen.saw("t", "c", 4)
    assert (seen.get("t", "a"), seen.get("t", "b"), seen.get("t", "c")) == (3, None, 4)
    seen.forget("t", "a")
    assert seen.get("t", "a") is None
    # Tenants are apart.
    assert seen.get("other", "c") is None


def test_parameters_hold_one_array_per_column_and_only_given_client_ids():
    now = dt.datetime.now(dt.UTC)
    rows = [Row("c-1", 1, None, 3, "k1", b"sealed"), Row(None, 2, "plain", 0, None, None)]
    params = parameters("t", "s", 7, rows, now)
    assert params[:6] == ("t", "s", 7, ["c-1"], 2, now)
    assert params[6:] == (["c-1", None], [1, 2], [None, "plain"], [3, 0], ["k1", None], [b"sealed", None])


def row(dup: bool, seq: int, role: int, client_msg_id: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(dup=dup, seq=seq, role=role, client_msg_id=client_msg_id)


def test_outcome_tells_missing_session_insert_and_duplicates_apart():
    assert not outcome([]).found
    inserted = outcome([row(False, 4, 2)])
    assert inserted.found and inserted.inserted and inserted.last_seq == 4 and inserted.duplicates == []
    moved = outcome([row(False, 9, 0)])
    assert moved.found and not moved.inserted and moved.last_seq == 9
    retry = outcome([row(True, 3, 1, "c-1"), row(False, 5, 0)])
    assert not retry.inserted and [r.client_msg_id for r in retry.duplicates] == ["c-1"]
