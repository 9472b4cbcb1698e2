"""Admission: slots pass straight through while free, then the queue decides who is next."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import ResourceExhausted
from services.router.admission import Admission
from services.router.core.load import ClusterLoad
from services.router.core.queues import (
    ClassLimits,
    Priority,
    QueueConfig,
    QueuedRequest,
    create_request_queue,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_admission(
    slots: int, tokens_per_s: float = 1e6, max_wait_s: float = 1000.0, headroom: int = 0
) -> Admission:
    limits = {p: ClassLimits(100, max_wait_s) for p in Priority}
    capacity = ClusterLoad(workers=1, slots=slots, headroom=headroom, tokens_per_s=tokens_per_s)
    queue = create_request_queue("priority", QueueConfig(limits), lambda: capacity)
    return Admission(queue, Clock())


def make_request(request_id: str, priority: Priority = Priority.STANDARD, tokens: int = 10) -> QueuedRequest:
    return QueuedRequest(request_id, "t", priority, tokens, enqueued_at=0.0)


async def hold(admission: Admission, request: QueuedRequest, log: list[str], go: asyncio.Event) -> None:
    async with admission.slot(request, None):
        log.append(request.request_id)
        await go.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_free_slots_pass_straight_through() -> None:
    admission = make_admission(slots=2)
    async with admission.slot(make_request("a"), None), admission.slot(make_request("b"), None):
        assert admission.inflight == 2 and len(admission.queue) == 0
    assert admission.inflight == 0


async def test_no_usable_worker_passes_through_to_dispatch() -> None:
    admission = make_admission(slots=0)
    async with admission.slot(make_request("a"), None):
        assert len(admission.queue) == 0


async def test_waiting_requests_get_slots_in_queue_order() -> None:
    admission = make_admission(slots=1)
    log: list[str] = []
    go = {name: asyncio.Event() for name in ("first", "batch", "interactive")}
    tasks = [asyncio.create_task(hold(admission, make_request("first"), log, go["first"]))]
    await settle()
    tasks.append(
        asyncio.create_task(hold(admission, make_request("batch", Priority.BATCH), log, go["batch"]))
    )
    await settle()
    tasks.append(
        asyncio.create_task(
            hold(admission, make_request("interactive", Priority.INTERACTIVE), log, go["interactive"])
        )
    )
    await settle()
    assert log == ["first"] and len(admission.queue) == 2
    for name in ("first", "interactive", "batch"):
        go[name].set()
    await asyncio.gather(*tasks)
    assert log == ["first", "interactive", "batch"]
    assert admission.inflight == 0


async def test_a_deadline_too_close_in_the_queue_is_refused_before_it_and_leaves_no_trace() -> None:
    admission = make_admission(slots=1, tokens_per_s=100.0)  # request b's 10 tokens take 0.1 s
    async with admission.slot(make_request("a"), None):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ResourceExhausted, match="too close to be met") as err:
            async with admission.slot(make_request("b"), 0.3):
                pass
        # Given up with time to spare: 0.3 s left minus the 0.1 s its reply needs at best.
        assert loop.time() - started < 0.29
        assert err.value.retry_after_ms > 0
        assert len(admission.queue) == 0 and admission.inflight == 1
    assert admission.inflight == 0


async def test_max_wait_is_refused_with_pushback() -> None:
    admission = make_admission(slots=1, max_wait_s=0.01)
    async with admission.slot(make_request("a"), None):
        with pytest.raises(ResourceExhausted, match="longest wait") as err:
            async with admission.slot(make_request("b"), None):
                pass
        assert err.value.retry_after_ms > 0 and len(admission.queue) == 0


async def test_cancelled_waiter_leaves_the_queue_and_the_slot_goes_on() -> None:
    admission = make_admission(slots=1)
    log: list[str] = []
    go = asyncio.Event()
    first = asyncio.create_task(hold(admission, make_request("first"), log, go))
    await settle()
    gone = asyncio.create_task(hold(admission, make_request("gone"), log, go))
    await settle()
    later = asyncio.create_task(hold(admission, make_request("later"), log, go))
    await settle()
    gone.cancel()
    await settle()
    assert len(admission.queue) == 1
    go.set()
    await asyncio.gather(first, later)
    assert log == ["first", "later"] and admission.inflight == 0


async def test_deadline_that_cannot_be_met_is_refused_before_waiting() -> None:
    admission = make_admission(slots=1, tokens_per_s=10.0)
    async with admission.slot(make_request("a"), None):
        late = QueuedRequest("b", "t", Priority.STANDARD, 100, enqueued_at=0.0, deadline=5.0)  # needs 10 s
        with pytest.raises(ResourceExhausted, match="deadline cannot be met"):
            async with admission.slot(late, 5.0):
                pass
        assert len(admission.queue) == 0


async def test_interactive_and_critical_start_in_the_headroom_while_lower_classes_wait() -> None:
    admission = make_admission(slots=1, headroom=1)
    log: list[str] = []
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(hold(admission, make_request(name, priority), log, go))
        for name, priority in (
            ("standard", Priority.STANDARD),
            ("batch", Priority.BATCH),
            ("interactive", Priority.INTERACTIVE),
            ("critical", Priority.CRITICAL),
        )
    ]
    await settle()
    # The slot went to the first; interactive took the headroom; critical waits (no more room)
    # but ahead of batch.
    assert log == ["standard", "interactive"] and admission.inflight == 2
    assert len(admission.queue) == 2
    go.set()
    await asyncio.gather(*tasks)
    assert log == ["standard", "interactive", "critical", "batch"]
