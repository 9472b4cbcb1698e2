"""Admission queues: class order, deadlines, aging, tenant fair share, bounds and refusals."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from services.common.errors import ResourceExhausted
from services.router.core.load import ClusterLoad
from services.router.core.queues import (
    ClassLimits,
    FCFSRequestQueue,
    Priority,
    PriorityRequestQueue,
    QueueConfig,
    QueuedRequest,
    RequestQueue,
    create_request_queue,
    drain,
    effective_priority,
)

P = Priority
_ids = itertools.count()


def make_request(
    priority: Priority = P.STANDARD,
    tenant: str = "t",
    tokens: int = 10,
    at: float = 0.0,
    deadline: float | None = None,
    request_id: str | None = None,
) -> QueuedRequest:
    return QueuedRequest(request_id or f"r{next(_ids)}", tenant, priority, tokens, at, deadline)


def make_queue(
    policy: str = "priority",
    depth: int = 100,
    max_wait_s: float = 1000.0,
    aging_s: float = 1000.0,
    rate: float = 1e9,
    urgent_slack_s: float = 0.0,
) -> RequestQueue:
    limits = {p: ClassLimits(depth, max_wait_s) for p in Priority}
    config = QueueConfig(limits, aging_s, urgent_slack_s)
    load = ClusterLoad(workers=1, slots=1, tokens_per_s=rate)
    return create_request_queue(policy, config, lambda: load)


def ids(requests: object) -> list[str]:
    return [r.request_id for r in requests]  # type: ignore[attr-defined]


def test_effective_priority_defaults_to_standard_and_is_capped_by_role() -> None:
    assert effective_priority(0) is P.STANDARD
    assert effective_priority(99) is P.STANDARD
    assert effective_priority(1) is P.CRITICAL
    assert effective_priority(1, cap=P.INTERACTIVE) is P.INTERACTIVE
    assert effective_priority(4, cap=P.INTERACTIVE) is P.BATCH


def test_classes_are_served_in_order() -> None:
    queue = make_queue()
    for i, priority in enumerate([P.BATCH, P.STANDARD, P.CRITICAL, P.INTERACTIVE]):
        queue.push(make_request(priority, request_id=priority.name, at=float(i)), now=float(i))
    assert ids(drain(queue, 4.0)) == ["CRITICAL", "INTERACTIVE", "STANDARD", "BATCH"]


def test_earliest_deadline_first_within_a_class() -> None:
    queue = make_queue()
    queue.push(make_request(deadline=50.0, request_id="late"), 0.0)
    queue.push(make_request(deadline=10.0, request_id="soon"), 0.0)
    queue.push(make_request(request_id="none"), 0.0)  # due when its max wait (1000 s) runs out
    assert ids(drain(queue, 0.0)) == ["soon", "late", "none"]


def test_batch_is_not_starved_by_a_steady_interactive_stream() -> None:
    queue = make_queue(aging_s=10.0)
    queue.push(make_request(P.BATCH, request_id="batch"), 0.0)
    served_at = None
    for step in range(100):
        now = float(step)
        queue.push(make_request(P.INTERACTIVE, at=now), now)  # one arrives and one leaves each second
        if queue.pop(now).request_id == "batch":  # type: ignore[union-attr]
            served_at = now
            break
    # Two aging periods lift BATCH to INTERACTIVE; then it is the oldest due there.
    assert served_at is not None and 20.0 <= served_at < 30.0


def test_aging_stops_below_critical() -> None:
    queue = make_queue(aging_s=1.0)
    old = make_request(P.BATCH, at=0.0)
    assert isinstance(queue, PriorityRequestQueue)
    assert queue.aged_class(old, 1.0) == P.STANDARD
    assert queue.aged_class(old, 500.0) == P.INTERACTIVE


def test_tenants_share_by_tokens_not_requests() -> None:
    queue = make_queue()
    for _ in range(30):
        queue.push(make_request(tenant="big", tokens=100), 0.0)  # few large requests
        queue.push(make_request(tenant="small", tokens=10), 0.0)  # many small ones
        queue.push(make_request(tenant="small", tokens=10), 0.0)
    tokens: Counter[str] = Counter()
    for _ in range(30):  # a window where both tenants still have work queued
        picked = queue.pop(0.0)
        assert picked is not None
        tokens[picked.tenant] += picked.tokens
    assert tokens["big"] / tokens["small"] == pytest.approx(1.0, abs=0.25)


def test_tenant_back_from_idle_gets_no_saved_credit() -> None:
    queue = make_queue()
    assert isinstance(queue, PriorityRequestQueue)
    for _ in range(10):
        queue.push(make_request(tenant="a", tokens=100), 0.0)
    for _ in range(5):
        queue.pop(0.0)  # "a" has been served 500 tokens
    for _ in range(5):
        queue.push(make_request(tenant="b", tokens=100), 0.0)
    # "b" starts level with "a": they alternate instead of "b" taking five in a row.
    assert [queue.pop(0.0).tenant for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]


def test_urgent_request_overtakes_fair_share() -> None:
    queue = make_queue(urgent_slack_s=2.0)
    queue.push(make_request(tenant="a", request_id="a1"), 0.0)
    queue.pop(0.0)  # "a" is ahead in tokens, "b" would go first by fair share
    queue.push(make_request(tenant="b", request_id="b1"), 0.0)
    queue.push(make_request(tenant="a", deadline=1.5, request_id="a-urgent"), 0.0)
    assert queue.pop(0.0).request_id == "a-urgent"  # type: ignore[union-attr]


def test_full_class_refuses_with_pushback_other_classes_still_accept() -> None:
    queue = make_queue(depth=2, rate=100.0)
    queue.push(make_request(P.BATCH, tokens=100), 0.0)
    queue.push(make_request(P.BATCH, tokens=100), 0.0)
    with pytest.raises(ResourceExhausted, match="BATCH queue full: 2 requests waiting") as err:
        queue.push(make_request(P.BATCH), 0.0)
    assert err.value.retry_after_ms == 2000  # 200 tokens ahead at 100 tokens/s
    queue.push(make_request(P.INTERACTIVE), 0.0)
    assert queue.depth(P.BATCH) == 2 and queue.depth(P.INTERACTIVE) == 1


def test_deadline_that_cannot_be_met_is_refused_at_once() -> None:
    queue = make_queue(rate=100.0)
    queue.push(make_request(P.STANDARD, tokens=300), 0.0)
    with pytest.raises(ResourceExhausted, match="deadline cannot be met") as err:
        queue.push(make_request(P.STANDARD, tokens=100, deadline=3.0), 0.0)  # needs 4 s
    assert err.value.retry_after_ms == 3000
    queue.push(make_request(P.STANDARD, tokens=100, deadline=4.0), 0.0)  # just fits
    # Lower classes do not count as ahead of a higher one.
    queue.push(make_request(P.CRITICAL, tokens=100, deadline=1.0), 0.0)
    assert len(queue) == 3


def test_expire_takes_out_what_waited_too_long_or_missed_its_deadline() -> None:
    queue = make_queue(max_wait_s=10.0)
    queue.push(make_request(at=0.0, request_id="old"), 0.0)
    queue.push(make_request(at=5.0, deadline=8.0, request_id="missed"), 5.0)
    queue.push(make_request(at=5.0, request_id="fresh"), 5.0)
    assert ids(queue.expire(9.0)) == ["missed"]
    assert ids(queue.expire(10.5)) == ["old"]
    assert ids(drain(queue, 10.5)) == ["fresh"]


def test_remove_takes_out_a_cancelled_request() -> None:
    queue = make_queue()
    queue.push(make_request(request_id="x"), 0.0)
    assert queue.remove("x") and not queue.remove("x")
    assert queue.pop(0.0) is None


def test_fcfs_ignores_classes_and_bounds_the_total() -> None:
    queue = make_queue("fcfs", depth=2)
    assert isinstance(queue, FCFSRequestQueue)
    queue.push(make_request(P.BATCH, request_id="1"), 0.0)
    queue.push(make_request(P.CRITICAL, request_id="2"), 0.0)
    with pytest.raises(ResourceExhausted, match="queue full: 2 requests waiting"):
        queue.push(make_request(P.CRITICAL), 0.0)
    assert ids(drain(queue, 0.0)) == ["1", "2"]


def test_factory_knows_its_policies() -> None:
    assert isinstance(create_request_queue("priority", QueueConfig(), ClusterLoad), PriorityRequestQueue)
    with pytest.raises(ValueError, match="unknown queue policy 'lifo'"):
        create_request_queue("lifo", QueueConfig(), ClusterLoad)


def test_queued_tokens_count_what_a_class_waits_behind() -> None:
    queue = make_queue()
    for priority, tokens in ((P.CRITICAL, 1), (P.INTERACTIVE, 10), (P.STANDARD, 100), (P.BATCH, 1000)):
        queue.push(make_request(priority, tokens=tokens), 0.0)
    assert queue.queued_tokens() == 1111
    assert queue.queued_tokens(P.INTERACTIVE) == 11
    assert queue.queued_tokens(P.CRITICAL) == 1
