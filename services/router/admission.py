"""Admission: the asyncio owner of the request queue.

A request takes a slot before it is dispatched and holds it until its stream ends. While
the workers have free slots nothing waits; once they are full, requests wait in the queue
and are let through in its order as slots free up, or refused by it with a pushback.

A BATCH request the degradation ladder holds back waits here too, in the same single wait
(one future, one deadline): held apart until the ladder lets BATCH go, then queued in its
turn. It is never held past `max_hold_s`, nor past the point where its reply could still
reach its caller in time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from services.common.errors import ResourceExhausted
from services.common.telemetry import span
from services.router.core.ladder import HoldVerdict, refused
from services.router.core.load import ClusterLoad
from services.router.core.queues import Priority, QueuedRequest, RequestQueue
from services.router.metrics import QUEUE_WAIT, SHED, priority_label

logger = logging.getLogger(__name__)

# A queued request gives up this long before its deadline at least, so its refusal (with a
# pushback) reaches the caller before the caller's own deadline does.
_REPLY_MARGIN_S = 0.1
# How often held requests ask the ladder again: the load falls with the workers' reports,
# which no slot release here announces.
HOLD_POLL_S = 0.1


class BatchHold(Protocol):
    """What admission asks while it holds BATCH back (the overload ladder answers)."""

    max_hold_s: float

    def batch_verdict(self) -> HoldVerdict: ...


@dataclass
class _Held:
    request: QueuedRequest
    since: float


class Admission:
    def __init__(
        self,
        queue: RequestQueue,
        clock: Callable[[], float] = time.monotonic,
        hold: BatchHold | None = None,
    ) -> None:
        self.queue = queue
        self.hold = hold
        self._held: dict[str, _Held] = {}
        self._hold_task: asyncio.Task[None] | None = None
        # The load model's view of the workers, the same the queue turns tokens into seconds with.
        self.capacity = queue.load
        self.clock = clock
        self.inflight = 0
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._keys = itertools.count()

    @asynccontextmanager
    async def slot(
        self, request: QueuedRequest, timeout_s: float | None, *, held: bool = False
    ) -> AsyncIterator[None]:
        """Hold a slot for the body; wait for one in the queue when all are taken, or (`held`:
        the ladder holds BATCH back) until the ladder lets it go and a slot is free."""
        capacity = self.capacity()
        held = held and self.hold is not None
        # No usable worker at all: let dispatch say so (UNAVAILABLE) instead of queueing.
        if not held and (capacity.slots <= 0 or self._free(request.priority, capacity)):
            self.inflight += 1
            QUEUE_WAIT.labels(priority_label(request.priority)).observe(0)
        else:
            started = self.clock()
            try:
                with span("queue wait", priority=request.priority.name):
                    await self._wait(request, capacity, timeout_s, held)
            finally:
                QUEUE_WAIT.labels(priority_label(request.priority)).observe(self.clock() - started)
        try:
            yield
        finally:
            self.inflight -= 1
            self._pump()

    def _free(self, priority: Priority, capacity: ClusterLoad) -> bool:
        """Whether a request of `priority` may start now, ahead of nobody who waits."""
        if self.inflight < capacity.slots and not self.queue:
            return True
        return (
            priority <= Priority.INTERACTIVE
            and self.inflight < capacity.slots + capacity.headroom
            and not self.queue.queued_tokens(priority)
        )

    async def _wait(
        self, request: QueuedRequest, capacity: ClusterLoad, timeout_s: float | None, held: bool
    ) -> None:
        # Keyed apart from the request id: callers may reuse theirs.
        key = f"{next(self._keys)}"
        keyed = replace(request, request_id=key)
        if held:
            self._held[key] = _Held(keyed, self.clock())
            if self._hold_task is None or self._hold_task.done():
                self._hold_task = asyncio.get_running_loop().create_task(self._poll_held())
        else:
            self.queue.push(keyed, self.clock())
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        max_wait_s = self.queue.config.limits[request.priority].max_wait_s
        # Leave the queue while the answer can still reach the caller before its deadline, and
        # once too little time is left to generate the reply (at best the full-batch speed: the
        # load model's `misses` with nothing left ahead).
        give_up_s = (
            None
            if timeout_s is None
            else timeout_s - max(_REPLY_MARGIN_S, capacity.seconds_for(request.tokens))
        )
        try:
            await asyncio.wait(
                {waiter}, timeout=max_wait_s if give_up_s is None else max(0.0, min(give_up_s, max_wait_s))
            )
        except asyncio.CancelledError:
            self._give_up(key, waiter)
            raise
        finally:
            self._waiters.pop(key, None)
        if not waiter.done():
            still_held = self._held.pop(key, None)
            self._give_up(key, waiter)
            if still_held is not None:
                raise self._held_too_long(self.clock() - still_held.since)
            if give_up_s is not None and give_up_s <= max_wait_s:
                waited = max(0.0, give_up_s)
                raise ResourceExhausted(
                    f"deadline: too close to be met after {waited:.2f}s in the admission queue "
                    f"({timeout_s:.2f}s were left when it arrived)",
                    capacity.min_retry_after_ms,
                )
            raise self._too_long(request.priority.name, max_wait_s)
        waiter.result()  # raises the queue's refusal for requests that waited too long

    def _give_up(self, key: str, waiter: asyncio.Future[None]) -> None:
        self._held.pop(key, None)
        if self.queue.remove(key) or not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled() and waiter.exception() is None:
            # The slot was granted just as the caller left: hand it on.
            self.inflight -= 1
            self._pump()

    def _pump(self) -> None:
        now = self.clock()
        for expired in self.queue.expire(now):
            waiter = self._waiters.get(expired.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(self._too_long(expired.priority.name, now - expired.enqueued_at))
        slots = self.capacity().slots
        while self.inflight < slots and (picked := self.queue.pop(now)) is not None:
            waiter = self._waiters.get(picked.request_id)
            if waiter is None or waiter.done():
                continue
            self.inflight += 1
            waiter.set_result(None)

    async def _poll_held(self) -> None:
        while self._held:
            await asyncio.sleep(HOLD_POLL_S)
            self._release_held()

    def _release_held(self) -> None:
        """Ask the ladder again: queue what it lets go, refuse what it now refuses or what was
        held for `max_hold_s`."""
        assert self.hold is not None
        verdict = self.hold.batch_verdict()
        now = self.clock()
        for key, held in list(self._held.items()):
            waiter = self._waiters.get(key)
            if waiter is None or waiter.done():
                del self._held[key]
                continue
            if verdict.refuse:
                del self._held[key]
                waiter.set_exception(refused(Priority.BATCH, verdict.wait_s, verdict.retry_after_ms))
            elif verdict.hold:
                if now - held.since + HOLD_POLL_S > self.hold.max_hold_s:
                    del self._held[key]
                    waiter.set_exception(self._held_too_long(now - held.since, verdict))
            else:
                del self._held[key]
                try:
                    self.queue.push(held.request, now)
                except ResourceExhausted as exc:
                    waiter.set_exception(exc)
        self._pump()

    def _held_too_long(self, held_s: float, verdict: HoldVerdict | None = None) -> ResourceExhausted:
        assert self.hold is not None
        verdict = verdict or self.hold.batch_verdict()
        SHED.labels("batch", "held").inc()
        return ResourceExhausted(
            f"overloaded: predicted wait {verdict.wait_s:.1f}s; BATCH held back for {held_s:.1f}s "
            "and its time is up",
            verdict.retry_after_ms,
        )

    def _too_long(self, queue_name: str, waited_s: float) -> ResourceExhausted:
        SHED.labels(queue_name.lower(), "max_wait").inc()
        return ResourceExhausted(
            f"waited {waited_s:.1f}s in the {queue_name} queue, its longest wait",
            self.capacity().min_retry_after_ms,
        )
