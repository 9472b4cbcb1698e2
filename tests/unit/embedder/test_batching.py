"""The pure batching state: order, token budget, max wait, results per job."""

from __future__ import annotations

import pytest

from services.embedder.batching import Batch, BatchQueue, Job, batch_cost


def make_queue(max_batch_tokens: int = 100, max_wait_s: float = 0.01) -> BatchQueue[str]:
    return BatchQueue(max_batch_tokens=max_batch_tokens, max_wait_s=max_wait_s)


def make_job(name: str, tokens: list[int], arrived: float = 0.0) -> Job[str]:
    return Job([f"{name}{i}" for i in range(len(tokens))], tokens, arrived=arrived)


def fake_encode(batch: Batch[str]) -> list[str]:
    """A 'vector' that names its text, so a misrouted result is visible."""
    return [f"vec({t})" for t in batch.texts]


def test_batch_cost_counts_padding_to_the_longest() -> None:
    assert batch_cost(4, 10) == 40


def test_arrival_order_decides_who_joins_a_batch_length_the_order_inside() -> None:
    queue = make_queue(max_batch_tokens=30, max_wait_s=0.0)
    queue.add(make_job("a", [9, 1, 5], arrived=0.0))
    queue.add(make_job("b", [1], arrived=0.001))
    batch = queue.next_batch(now=0.0)
    assert batch is not None
    # 3 x 9 fits the budget, a 4th row would not: b waits although it is short.
    assert batch.texts == ["a1", "a2", "a0"]
    assert queue.waiting == 1


def test_nothing_ready_before_max_wait_then_everything_sorted_by_length() -> None:
    queue = make_queue(max_wait_s=0.01)
    queue.add(make_job("a", [3, 3], arrived=0.0))
    queue.add(make_job("b", [2], arrived=0.005))
    assert queue.next_batch(now=0.009) is None
    assert queue.wake_at() == pytest.approx(0.01)
    batch = queue.next_batch(now=0.01)
    assert batch is not None
    # Shortest first, so the encoder's chunks hold inputs of similar length.
    assert batch.texts == ["b0", "a0", "a1"]
    assert queue.waiting == 0
    assert queue.next_batch(now=1.0) is None
    assert queue.wake_at() is None


def test_full_budget_is_ready_at_once_and_cut_by_padded_tokens() -> None:
    queue = make_queue(max_batch_tokens=40, max_wait_s=10.0)
    queue.add(make_job("a", [10, 10, 10]))
    assert queue.next_batch(now=0.0) is None  # 30 of 40: not full, wait not over
    queue.add(make_job("b", [10, 20]))
    batch = queue.next_batch(now=0.0)
    assert batch is not None
    # 4 x 10 = 40 fits; adding b1 would pad 5 rows to 20 tokens = 100.
    assert batch.texts == ["a0", "a1", "a2", "b0"]
    assert batch.cost == 40
    assert queue.waiting == 1
    assert queue.waiting_tokens == 20


def test_one_long_item_pads_the_batch() -> None:
    queue = make_queue(max_batch_tokens=50, max_wait_s=0.0)
    queue.add(make_job("a", [2, 30, 2, 2]))
    first = queue.next_batch(now=0.0)
    second = queue.next_batch(now=0.0)
    assert first is not None and second is not None
    assert first.texts == ["a0"]  # a0 + a1 would cost 2 x 30 = 60
    assert second.texts == ["a1"]  # a1 + a2 would cost 60 too
    assert queue.waiting == 2


def test_an_item_over_the_budget_runs_alone() -> None:
    queue = make_queue(max_batch_tokens=10, max_wait_s=0.0)
    queue.add(make_job("a", [50, 1]))
    batch = queue.next_batch(now=0.0)
    assert batch is not None and batch.texts == ["a0"]


def test_a_job_larger_than_the_budget_spans_batches_and_finishes_once() -> None:
    queue = make_queue(max_batch_tokens=20, max_wait_s=0.0)
    job = make_job("a", [10, 10, 10, 10, 10])
    queue.add(job)
    sizes = []
    finished: list[Job[str]] = []
    while (batch := queue.next_batch(now=0.0)) is not None:
        sizes.append(len(batch))
        finished += queue.complete(batch, fake_encode(batch))
        if batch.texts[-1] != "a4":
            assert finished == []
    assert sizes == [2, 2, 1]
    assert finished == [job]
    assert job.results == [f"vec(a{i})" for i in range(5)]


def test_each_job_gets_exactly_its_own_results_in_order() -> None:
    queue = make_queue(max_batch_tokens=1000, max_wait_s=0.0)
    jobs = [make_job(name, [1] * n) for name, n in (("a", 3), ("b", 1), ("c", 2))]
    for job in jobs:
        queue.add(job)
    batch = queue.next_batch(now=0.0)
    assert batch is not None and len(batch) == 6
    finished = queue.complete(batch, fake_encode(batch))
    assert finished == jobs
    assert [job.results for job in jobs] == [
        ["vec(a0)", "vec(a1)", "vec(a2)"],
        ["vec(b0)"],
        ["vec(c0)", "vec(c1)"],
    ]


def test_complete_rejects_a_wrong_number_of_vectors() -> None:
    queue = make_queue(max_wait_s=0.0)
    queue.add(make_job("a", [1, 1]))
    batch = queue.next_batch(now=0.0)
    assert batch is not None
    with pytest.raises(ValueError, match="1 vectors for 2 inputs"):
        queue.complete(batch, ["only one"])


def test_cancel_drops_queued_items_and_ignores_running_ones() -> None:
    queue = make_queue(max_batch_tokens=2, max_wait_s=0.0)
    gone, kept = make_job("g", [1, 1, 1]), make_job("k", [1])
    queue.add(gone)
    queue.add(kept)
    running = queue.next_batch(now=0.0)
    assert running is not None and running.texts == ["g0", "g1"]
    queue.cancel(gone)
    assert queue.waiting == 1
    assert queue.complete(running, fake_encode(running)) == []
    assert gone.results == [None, None, None]
    batch = queue.next_batch(now=0.0)
    assert batch is not None and batch.texts == ["k0"]
    assert queue.complete(batch, fake_encode(batch)) == [kept]


def test_fail_returns_the_batch_jobs_and_drops_their_queued_rest() -> None:
    queue = make_queue(max_batch_tokens=2, max_wait_s=0.0)
    a, b, c = make_job("a", [1]), make_job("b", [1, 1]), make_job("c", [1])
    for job in (a, b, c):
        queue.add(job)
    batch = queue.next_batch(now=0.0)
    assert batch is not None and batch.texts == ["a0", "b0"]
    assert queue.fail(batch) == [a, b]
    rest = queue.next_batch(now=0.0)
    assert rest is not None and rest.texts == ["c0"]


def test_wait_is_measured_from_the_oldest_queued_item() -> None:
    queue = make_queue(max_wait_s=1.0)
    queue.add(make_job("a", [1], arrived=5.0))
    queue.add(make_job("b", [1], arrived=5.5))
    assert queue.wake_at() == 6.0
    assert queue.next_batch(now=5.9) is None
    batch = queue.next_batch(now=6.0)
    assert batch is not None and batch.texts == ["a0", "b0"]


@pytest.mark.parametrize(
    ("texts", "tokens", "message"),
    [(["a"], [1, 2], "1 texts but 2 token counts"), ([], [], "at least one input")],
)
def test_job_checks_its_inputs(texts: list[str], tokens: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Job(texts, tokens, arrived=0.0)


@pytest.mark.parametrize(
    ("budget", "wait", "message"), [(0, 0.0, "max_batch_tokens=0"), (1, -1.0, "max_wait_s")]
)
def test_queue_checks_its_limits(budget: int, wait: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchQueue(budget, wait)
