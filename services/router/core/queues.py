"""Admission queues: which waiting request is dispatched next, and which is refused at once.

Pure state driven by a clock reading (like vLLM's request_queue.py: a small interface, two
policies and a factory). The priority queue orders by class with aging, then serves tenants
in proportion to the tokens they were given, earliest deadline first within a tenant, and
earliest deadline first across tenants for requests about to miss theirs.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted
from services.router.core.load import ClusterLoad


class Priority(enum.IntEnum):
    """Lower value is served first; the values match common.v1.Priority."""

    CRITICAL = 1
    INTERACTIVE = 2
    STANDARD = 3
    BATCH = 4


def effective_priority(requested: int, cap: Priority = Priority.CRITICAL) -> Priority:
    """The request's class (unspecified: STANDARD), no higher than the caller's role allows."""
    wanted = Priority(requested) if requested in Priority._value2member_map_ else Priority.STANDARD
    return max(wanted, cap)


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    tenant: str
    priority: Priority
    tokens: int  # prompt + max_tokens: the work it brings
    enqueued_at: float
    deadline: float | None = None  # same clock as enqueued_at


@dataclass(frozen=True)
class ClassLimits:
    max_depth: int
    max_wait_s: float


DEFAULT_LIMITS: Mapping[Priority, ClassLimits] = {
    Priority.CRITICAL: ClassLimits(max_depth=256, max_wait_s=30.0),
    Priority.INTERACTIVE: ClassLimits(max_depth=512, max_wait_s=30.0),
    Priority.STANDARD: ClassLimits(max_depth=1024, max_wait_s=120.0),
    Priority.BATCH: ClassLimits(max_depth=10_000, max_wait_s=3600.0),
}


@dataclass(frozen=True)
class QueueConfig:
    limits: Mapping[Priority, ClassLimits] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    # Each full aging period waited lifts a request one class, up to INTERACTIVE: a steady
    # stream of interactive traffic can delay BATCH but not starve it.
    aging_s: float = 30.0
    # Requests this close to their deadline skip the tenant fair share and go by deadline.
    urgent_slack_s: float = 1.0


class RequestQueue(ABC):
    """What the admission task needs of a queue; `now` is the owner's clock reading, `load`
    the load model's view of the workers behind it (turns queued tokens into seconds)."""

    def __init__(self, config: QueueConfig, load: Callable[[], ClusterLoad]) -> None:
        self.config = config
        self.load = load
        self._items: list[QueuedRequest] = []  # arrival order; depths are bounded, scans are cheap

    @abstractmethod
    def push(self, request: QueuedRequest, now: float) -> None:
        """Queue it, or raise ResourceExhausted (with a retry-after) when it cannot be served."""

    @abstractmethod
    def pop(self, now: float) -> QueuedRequest | None:
        """The request to dispatch next; None when empty."""

    def remove(self, request_id: str) -> bool:
        """Take out a request whose caller went away; True when it was queued."""
        kept = [r for r in self._items if r.request_id != request_id]
        removed = len(kept) < len(self._items)
        self._items = kept
        return removed

    def expire(self, now: float) -> list[QueuedRequest]:
        """Take out the requests past their class's max wait or their deadline."""
        gone = [r for r in self._items if self._too_old(r, now)]
        self._items = [r for r in self._items if not self._too_old(r, now)]
        return gone

    def __len__(self) -> int:
        return len(self._items)

    def queued_tokens(self, ahead_of: Priority = Priority.BATCH) -> int:
        """Prompt + max tokens queued in `ahead_of`'s class or a higher one: what a new request
        of that class waits behind."""
        return sum(r.tokens for r in self._items if r.priority <= ahead_of)

    def depth(self, priority: Priority) -> int:
        return sum(1 for r in self._items if r.priority is priority)

    def _check_deadline(self, request: QueuedRequest, tokens_ahead: int, now: float) -> None:
        load = self.load()
        if request.deadline is None or not load.misses(request.deadline - now, tokens_ahead, request.tokens):
            return
        finish = load.finish_s(tokens_ahead, request.tokens)
        raise ResourceExhausted(
            f"the deadline cannot be met: {tokens_ahead} tokens are queued ahead, predicted finish "
            f"{finish:.1f}s from now, deadline in {request.deadline - now:.1f}s",
            load.retry_after_ms(tokens_ahead),
        )

    def _too_old(self, request: QueuedRequest, now: float) -> bool:
        if request.deadline is not None and now >= request.deadline:
            return True
        return now - request.enqueued_at > self.config.limits[request.priority].max_wait_s


class FCFSRequestQueue(RequestQueue):
    """Arrival order, one bound for all (the BATCH limits apply to everything)."""

    def push(self, request: QueuedRequest, now: float) -> None:
        ahead = sum(r.tokens for r in self._items)
        limit = self.config.limits[Priority.BATCH].max_depth
        if len(self._items) >= limit:
            raise ResourceExhausted(
                f"queue full: {limit} requests waiting", self.load().retry_after_ms(ahead)
            )
        self._check_deadline(request, ahead, now)
        self._items.append(request)

    def pop(self, now: float) -> QueuedRequest | None:
        return self._items.pop(0) if self._items else None


class PriorityRequestQueue(RequestQueue):
    """Classes with aging, token-weighted fair share between tenants, deadlines."""

    def __init__(self, config: QueueConfig, load: Callable[[], ClusterLoad]) -> None:
        super().__init__(config, load)
        self._served: dict[str, int] = {}  # tokens dispatched per tenant (fair-share clock)

    def aged_class(self, request: QueuedRequest, now: float) -> int:
        lifted = int((now - request.enqueued_at) // self.config.aging_s) if self.config.aging_s > 0 else 0
        return max(int(Priority.INTERACTIVE), int(request.priority) - lifted)

    def _due(self, request: QueuedRequest) -> float:
        """Deadline, or when the class's max wait runs out for a request without one."""
        if request.deadline is not None:
            return request.deadline
        return request.enqueued_at + self.config.limits[request.priority].max_wait_s

    def push(self, request: QueuedRequest, now: float) -> None:
        limits = self.config.limits[request.priority]
        ahead = sum(r.tokens for r in self._items if self.aged_class(r, now) <= request.priority)
        if self.depth(request.priority) >= limits.max_depth:
            raise ResourceExhausted(
                f"{request.priority.name} queue full: {limits.max_depth} requests waiting",
                self.load().retry_after_ms(ahead),
            )
        self._check_deadline(request, ahead, now)
        if not any(r.tenant == request.tenant for r in self._items):
            # A tenant back from idle starts level with the least-served active tenant:
            # being away earns no credit to crowd the others out later.
            floor = min((self._served.get(r.tenant, 0) for r in self._items), default=0)
            self._served[request.tenant] = max(self._served.get(request.tenant, 0), floor)
        self._items.append(request)

    def pop(self, now: float) -> QueuedRequest | None:
        if not self._items:
            return None
        top = min(self.aged_class(r, now) for r in self._items)
        eligible = [r for r in self._items if self.aged_class(r, now) == top]
        urgent = [r for r in eligible if self._due(r) - now <= self.config.urgent_slack_s]
        if urgent:
            picked = min(urgent, key=self._due)
        else:
            tenant = min({r.tenant for r in eligible}, key=lambda t: (self._served.get(t, 0), t))
            picked = min((r for r in eligible if r.tenant == tenant), key=self._due)
        self._items.remove(picked)
        self._served[picked.tenant] = self._served.get(picked.tenant, 0) + picked.tokens
        return picked

    def tokens_served(self) -> dict[str, int]:
        return dict(self._served)


QUEUE_POLICIES = ("priority", "fcfs")


def create_request_queue(policy: str, config: QueueConfig, load: Callable[[], ClusterLoad]) -> RequestQueue:
    if policy == "priority":
        return PriorityRequestQueue(config, load)
    if policy == "fcfs":
        return FCFSRequestQueue(config, load)
    raise ValueError(f"unknown queue policy {policy!r} (known: {', '.join(QUEUE_POLICIES)})")


def drain(queue: RequestQueue, now: float) -> Iterable[QueuedRequest]:
    """Everything left, in dispatch order (for shutdown and tests)."""
    while (item := queue.pop(now)) is not None:
        yield item
