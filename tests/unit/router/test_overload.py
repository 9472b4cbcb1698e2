"""Overload handling on plain fakes (no server, no workers): the load model's predicted wait
climbs the ladder, BATCH is held back and let go, refusals carry the ladder's pushback, a
deadline the load makes impossible is refused at once (CRITICAL is tried all the same), and
exact repeats of deterministic requests are answered from the reply cache."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from services.common.errors import ResourceExhausted
from services.router.admission import HOLD_POLL_S, Admission
from services.router.core.domain import (
    DegradationStep,
    Delta,
    FinishReason,
    ModelKind,
    ModelSpec,
    Sampling,
    Usage,
    WorkerRequest,
)
from services.router.core.ladder import LadderConfig
from services.router.core.load import ClusterLoad
from services.router.core.queues import Priority, QueueConfig, QueuedRequest, create_request_queue
from services.router.core.reply_cache import ReplyCache
from services.router.overload import Overload, cached_reply

MEDIUM = ModelSpec("medium-model", ModelKind.CHAT, context_length=2048, tier="medium")
SMALL = ModelSpec("small-model", ModelKind.CHAT, context_length=2048, tier="small")
CATALOG = (MEDIUM, SMALL)
CONFIG = LadderConfig(thresholds_s=(2.0, 4.0, 6.0, 10.0, 20.0), step_down_margin=0.2, capped_max_tokens=128)
SPEED = 100.0  # cluster tokens/s: a predicted wait of w seconds is w * 100 queued tokens


def cluster_waiting(seconds: float) -> ClusterLoad:
    return ClusterLoad(workers=2, slots=8, tokens_per_s=SPEED, waiting_tokens=round(seconds * SPEED))


class Loads:
    """The cluster load each call of `cluster()` sees, the last one repeated."""

    def __init__(self, *waits: float) -> None:
        self.waits = list(waits)
        self.calls = 0

    def __call__(self) -> ClusterLoad:
        wait = self.waits[min(self.calls, len(self.waits) - 1)]
        self.calls += 1
        return cluster_waiting(wait)


def overload(cluster: Callable[[], ClusterLoad], *, ahead: int = 0, max_hold_s: float = 5.0) -> Overload:
    return Overload(CONFIG, ReplyCache(16), cluster, lambda _priority: ahead, max_hold_s=max_hold_s)


def request(max_tokens: int = 64, temperature: float | None = None) -> WorkerRequest:
    return WorkerRequest(
        "r1", MEDIUM.id, max_tokens, prompt="hello", sampling=Sampling(temperature=temperature)
    )


async def plan(
    ov: Overload,
    priority: Priority,
    req: WorkerRequest | None = None,
    *,
    allow_fallback: bool = False,
    prompt_tokens: int = 10,
    remaining: float | None = None,
):
    return await ov.plan(
        req or request(),
        MEDIUM,
        CATALOG,
        priority,
        allow_fallback=allow_fallback,
        prompt_tokens=prompt_tokens,
        remaining=lambda: remaining,
    )


async def test_at_the_refusal_rung_all_but_critical_are_refused_with_the_ladders_pushback() -> None:
    ov = overload(Loads(25.0))
    for priority in (Priority.INTERACTIVE, Priority.STANDARD, Priority.BATCH):
        with pytest.raises(ResourceExhausted) as refused:
            await plan(ov, priority)
        # Back once the wait is below the refusal rung less its margin: 25 - 20 * 0.8 = 9 s.
        assert refused.value.retry_after_ms == 9000
        assert "predicted wait 25.0s" in str(refused.value)
    critical = await plan(ov, Priority.CRITICAL, request(max_tokens=500))
    assert (critical.model, critical.max_tokens, critical.steps) == (MEDIUM.id, 500, ())


async def test_a_light_load_changes_nothing() -> None:
    ov = overload(Loads(1.0))
    got = await plan(ov, Priority.BATCH, request(max_tokens=500), allow_fallback=True)
    assert (got.model, got.max_tokens, got.steps, got.cached) == (MEDIUM.id, 500, (), None)


async def test_standard_is_capped_and_moved_to_the_smaller_tier_when_it_allows_it() -> None:
    ov = overload(Loads(5.0))
    got = await plan(ov, Priority.STANDARD, request(max_tokens=500), allow_fallback=True)
    assert (got.model, got.max_tokens) == (SMALL.id, CONFIG.capped_max_tokens)
    assert [s.step for s in got.steps] == [DegradationStep.MAX_TOKENS_CAPPED, DegradationStep.FALLBACK_MODEL]
    kept = await plan(ov, Priority.STANDARD, request(max_tokens=500), allow_fallback=False)
    assert (kept.model, kept.max_tokens) == (MEDIUM.id, CONFIG.capped_max_tokens)
    # INTERACTIVE keeps its length; only the model moves.
    interactive = await plan(ov, Priority.INTERACTIVE, request(max_tokens=500), allow_fallback=True)
    assert (interactive.model, interactive.max_tokens) == (SMALL.id, 500)


def held_admission(ov: Overload, cluster: Callable[[], ClusterLoad]) -> Admission:
    return Admission(create_request_queue("priority", QueueConfig(), cluster), hold=ov)


def queued(priority: Priority = Priority.BATCH, deadline: float | None = None) -> QueuedRequest:
    return QueuedRequest("r1", "t", priority, 74, enqueued_at=time.monotonic(), deadline=deadline)


async def test_batch_is_held_in_its_one_wait_while_the_load_is_high_and_let_go_once_it_falls() -> None:
    loads = Loads(12.0, 12.0, 12.0, 12.0, 0.5)
    ov = overload(loads)
    got = await plan(ov, Priority.BATCH)
    assert got.held and (got.model, got.steps) == (MEDIUM.id, ())  # planned at once, not asleep
    admission = held_admission(ov, loads)
    started = time.monotonic()
    async with admission.slot(queued(), None, held=True):
        # Asked the ladder again after each hold poll until the wait fell; then admitted.
        assert loads.calls >= 5
        assert time.monotonic() - started >= 2 * HOLD_POLL_S
        assert admission.inflight == 1
    # Other classes are not held at the same load.
    standard = await plan(overload(Loads(12.0)), Priority.STANDARD)
    assert not standard.held and standard.model == MEDIUM.id


async def test_batch_held_too_long_is_refused_before_its_hold_budget_or_deadline_runs_out() -> None:
    ov = overload(Loads(12.0), max_hold_s=0.35)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="BATCH held back") as refused:
        async with held_admission(ov, Loads(12.0)).slot(queued(), None, held=True):
            pass
    held = time.monotonic() - started
    assert 0.2 <= held <= 0.35 + 0.2
    assert refused.value.retry_after_ms >= CONFIG.min_retry_after_ms
    # A deadline shorter than the hold budget ends the hold first: its caller is not kept
    # waiting for a reply that could not come in time.
    long_hold = overload(Loads(12.0), max_hold_s=5.0)
    deadline = time.monotonic() + 0.3
    with pytest.raises(ResourceExhausted, match="BATCH held back"):
        async with held_admission(long_hold, Loads(12.0)).slot(
            queued(deadline=deadline), deadline - time.monotonic(), held=True
        ):
            pass
    assert time.monotonic() < deadline


async def test_held_batch_is_refused_when_the_ladder_climbs_to_refusal() -> None:
    loads = Loads(12.0, 12.0, 30.0)
    ov = overload(loads)
    with pytest.raises(ResourceExhausted, match="BATCH requests are refused") as refused:
        async with held_admission(ov, loads).slot(queued(), None, held=True):
            pass
    assert refused.value.retry_after_ms >= 1000


async def test_a_deadline_the_load_cannot_meet_is_refused_at_once_but_critical_is_tried() -> None:
    # 3 s of queued work at 100 tok/s. Its own max_tokens is a cap, not a prediction: 500 of
    # them do not count against the deadline up front (the queue holds it to them).
    ov = overload(Loads(3.0))
    with pytest.raises(ResourceExhausted, match="the deadline cannot be met") as refused:
        await plan(ov, Priority.INTERACTIVE, request(max_tokens=500), remaining=2.9)
    assert refused.value.retry_after_ms == 3000  # once the queued work has drained
    assert (await plan(ov, Priority.INTERACTIVE, request(max_tokens=500), remaining=3.1)).model == MEDIUM.id
    assert (await plan(ov, Priority.CRITICAL, request(max_tokens=500), remaining=1.0)).model == MEDIUM.id
    # Work queued in this router ahead of the class counts as well.
    with pytest.raises(ResourceExhausted, match="the deadline cannot be met"):
        await plan(overload(Loads(3.0), ahead=50), Priority.INTERACTIVE, remaining=3.1)
    # With no usable worker there is no estimate: placement, not a deadline refusal, answers.
    none = Overload(CONFIG, ReplyCache(4), ClusterLoad, lambda _p: 0, max_hold_s=1.0)
    assert (await plan(none, Priority.INTERACTIVE, remaining=0.5)).model == MEDIUM.id


async def test_an_exact_repeat_of_a_deterministic_request_is_answered_from_the_cache_under_load() -> None:
    loads = Loads(0.0)
    ov = overload(loads)
    first = await plan(ov, Priority.STANDARD, request(max_tokens=32))
    assert first.cache_key is not None and first.cached is None
    last = Delta("!", (3,), finish=FinishReason.STOP, usage=Usage(10, 3))
    ov.remember(first.cache_key, cached_reply(last, MEDIUM.id, ["hi", " there", "!"], [1, 2, 3]))

    loads.waits = [7.0]  # the cached-replies rung
    again = await plan(ov, Priority.STANDARD, request(max_tokens=32), remaining=0.01)
    # From the cache even with a deadline no worker could meet.
    assert again.cached is not None
    assert (again.cached.text, again.cached.token_ids, again.cached.completion_tokens) == (
        "hi there!",
        (1, 2, 3),
        3,
    )
    assert [s.step for s in again.steps] == [DegradationStep.CACHED_REPLY]
    # A different request, or a sampled one, is not.
    other = await plan(ov, Priority.STANDARD, request(max_tokens=33))
    assert other.cached is None
    sampled = await plan(ov, Priority.STANDARD, request(max_tokens=32, temperature=0.8))
    assert sampled.cached is None and sampled.cache_key is None
