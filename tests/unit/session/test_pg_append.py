"""The pure parts of the one-statement append: predictions, parameters, the statement's answer."""

from __future__ import annotations

import asyncio
import datetime as dt
from types import SimpleNamespace

from services.session.pg_append import Append, Batcher, LastSeqs, Row, outcomes, parameters


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


def test_parameters_hold_one_array_per_append_and_one_per_message_column():
    now = dt.datetime.now(dt.UTC)
    first = Append(
        "t", "s1", 7, [Row("c-1", 1, None, 3, "k1", b"sealed"), Row(None, 2, "plain", 0, None, None)], now
    )
    second = Append("t", "s2", 0, [Row("c-9", 1, None, 1, "k1", b"x")], now)
    params = parameters([first, second])
    assert params[:5] == (["t", "t"], ["s1", "s2"], [7, 0], [2, 1], [now, now])
    assert params[5:] == (
        [1, 1, 2],
        ["c-1", None, "c-9"],
        [1, 2, 1],
        [None, "plain", None],
        [3, 0, 1],
        ["k1", None, "k1"],
        [b"sealed", None, b"x"],
        [1, 2, 1],
    )


def row(dup: bool, k: int, seq: int, role: int, client_msg_id: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(dup=dup, k=k, seq=seq, role=role, client_msg_id=client_msg_id)


def test_outcomes_tell_missing_sessions_inserts_and_duplicates_apart_per_append():
    missing, inserted, moved, retry = outcomes(
        [row(False, 2, 4, 2), row(False, 3, 9, 0), row(True, 4, 3, 1, "c-1"), row(False, 4, 5, 0)], 4
    )
    assert not missing.found
    assert inserted.found and inserted.inserted and inserted.last_seq == 4 and inserted.duplicates == []
    assert moved.found and not moved.inserted and moved.last_seq == 9
    assert not retry.inserted and [r.client_msg_id for r in retry.duplicates] == ["c-1"]


class Recorder:
    """A batch runner that records each batch and answers item * 10 (slowly, so others queue)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.fail_on = fail_on
        self.running = self.most_running = 0

    async def __call__(self, items: list[tuple[str, int]]) -> list[int]:
        self.batches.append(items)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        if self.fail_on is not None and any(n == self.fail_on for _, n in items):
            raise ValueError("bad batch")
        return [n * 10 for _, n in items]


def batcher(run: Recorder, slots: int = 1, max_batch: int = 8) -> Batcher[tuple[str, int], int]:
    return Batcher(run, key=lambda item: item[0], slots=slots, max_batch=max_batch)


async def test_items_arriving_together_share_batches_of_distinct_keys():
    run = Recorder()
    b = batcher(run)
    items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("d", 5)]
    assert await asyncio.gather(*(b.submit(i) for i in items)) == [10, 20, 30, 40, 50]
    assert all(len({key for key, _ in batch}) == len(batch) for batch in run.batches)
    assert sorted(i for batch in run.batches for i in batch) == sorted(items)
    assert len(run.batches) == 2  # ("a", 3) waited for the second, behind ("a", 1)


async def test_a_lone_item_runs_at_once_and_slots_bound_the_statements_in_flight():
    run = Recorder()
    b = batcher(run, slots=2, max_batch=2)
    assert await b.submit(("a", 1)) == 10 and run.batches == [[("a", 1)]]
    assert await asyncio.gather(*(b.submit((f"k{n}", n)) for n in range(8))) == [n * 10 for n in range(8)]
    assert [len(batch) for batch in run.batches[1:]] == [2, 2, 2, 2]
    assert run.most_running == 2


async def test_a_failed_batch_fails_its_items_only():
    run = Recorder(fail_on=2)
    b = batcher(run, max_batch=2)
    results = await asyncio.gather(*(b.submit((f"k{n}", n)) for n in range(1, 5)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, ValueError)]
    assert len(failed) == 1 + sum(len(batch) > 1 for batch in run.batches if ("k2", 2) in batch)
    assert 40 in results


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_batch():
    run = Recorder()
    b = batcher(run)
    first = asyncio.ensure_future(b.submit(("a", 1)))
    second = asyncio.ensure_future(b.submit(("b", 2)))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 20
