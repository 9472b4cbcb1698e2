"""The degradation ladder: what the router gives up, in order, as measured load grows.

Pure policy. Load is the predicted wait of a new request, as the load model
(`core/load.py`) gives it; each rung has a threshold in seconds and the ladder climbs at once but only
steps down once the wait falls a margin below a rung, so it does not flap between reports.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import ResourceExhausted
from services.router.core.catalog import TIERS
from services.router.core.domain import Degradation, DegradationStep, ModelSpec
from services.router.core.queues import Priority


class Rung(enum.IntEnum):
    NORMAL = 0
    CAP_MAX_TOKENS = 1  # STANDARD and BATCH get at most `capped_max_tokens`
    FALLBACK_MODEL = 2  # requests that allow it go to a smaller tier
    CACHED_REPLIES = 3  # exact repeats of deterministic requests answered from the cache
    HOLD_BATCH = 4  # BATCH stays queued
    REFUSE = 5  # all but CRITICAL refused with a retry pushback


@dataclass(frozen=True)
class LadderConfig:
    # Predicted wait (seconds) at which each rung from CAP_MAX_TOKENS to REFUSE starts.
    thresholds_s: tuple[float, float, float, float, float] = (2.0, 4.0, 6.0, 10.0, 20.0)
    # A rung is left only when the wait is this fraction below its threshold.
    step_down_margin: float = 0.2
    capped_max_tokens: int = 128
    min_retry_after_ms: int = 100

    def __post_init__(self) -> None:
        if list(self.thresholds_s) != sorted(self.thresholds_s) or self.thresholds_s[0] <= 0:
            raise ValueError(f"thresholds_s={self.thresholds_s}: must be positive and increasing")
        if not 0 <= self.step_down_margin < 1:
            raise ValueError(f"step_down_margin={self.step_down_margin}: must be in [0, 1)")


@dataclass(frozen=True)
class RequestFacts:
    priority: Priority
    max_tokens: int
    allow_fallback: bool = False
    fallback_model: str | None = None  # the smaller tier from the catalog, if there is one
    deterministic: bool = False  # greedy or seeded: a repeat gives the same reply
    cached: bool = False  # an exact repeat of it is in the reply cache


@dataclass(frozen=True)
class Decision:
    rung: Rung
    max_tokens: int
    model: str | None = None  # the fallback model, when moved to one
    from_cache: bool = False
    hold: bool = False  # leave it queued and ask again later
    refuse_retry_after_ms: int | None = None  # refuse with RESOURCE_EXHAUSTED and this pushback
    steps: tuple[Degradation, ...] = ()  # what to record in the response


@dataclass(frozen=True)
class HoldVerdict:
    """What the BATCH ladder says of the requests admission holds back, at one load."""

    wait_s: float  # the predicted wait it was judged at
    hold: bool
    refuse: bool
    retry_after_ms: int


def refused(priority: Priority, wait_s: float, retry_after_ms: int) -> ResourceExhausted:
    """The refusal of the REFUSE rung, for a new request or one held back."""
    return ResourceExhausted(
        f"overloaded: predicted wait {wait_s:.1f}s; {priority.name} requests are refused until it falls",
        retry_after_ms,
    )


class Ladder:
    """Keeps the current rung; `decide` says what one request gets at that rung."""

    def __init__(self, config: LadderConfig | None = None) -> None:
        self.config = config or LadderConfig()
        self.rung = Rung.NORMAL

    def update(self, wait: float) -> Rung:
        """Move to the rung a predicted wait of `wait` seconds calls for (up at once, down with
        a margin)."""
        thresholds = self.config.thresholds_s
        target = Rung(sum(1 for t in thresholds if wait >= t))
        if target >= self.rung:
            self.rung = target
        keep = 1 - self.config.step_down_margin
        while self.rung > target and wait < thresholds[self.rung - 1] * keep:
            self.rung = Rung(self.rung - 1)
        return self.rung

    def decide(self, request: RequestFacts, wait: float) -> Decision:
        """What `request` gets when a new request is predicted to wait `wait` seconds (the
        load model's `ClusterLoad.wait_s`)."""
        rung = self.update(wait)
        if request.priority is Priority.CRITICAL or rung is Rung.NORMAL:
            return Decision(rung, request.max_tokens)
        if rung >= Rung.REFUSE:
            return Decision(rung, request.max_tokens, refuse_retry_after_ms=self.retry_after_ms(wait))
        if rung >= Rung.HOLD_BATCH and request.priority is Priority.BATCH:
            return Decision(rung, request.max_tokens, hold=True)
        why = f"overloaded: predicted wait {wait:.1f}s"
        if rung >= Rung.CACHED_REPLIES and request.deterministic and request.cached:
            step = Degradation(DegradationStep.CACHED_REPLY, f"{why}; an identical earlier reply was reused")
            return Decision(rung, request.max_tokens, from_cache=True, steps=(step,))
        steps: list[Degradation] = []
        max_tokens = request.max_tokens
        cap = self.config.capped_max_tokens
        if request.priority >= Priority.STANDARD and max_tokens > cap:
            max_tokens = cap
            steps.append(Degradation(DegradationStep.MAX_TOKENS_CAPPED, f"{why}; max_tokens capped at {cap}"))
        model = None
        if rung >= Rung.FALLBACK_MODEL and request.allow_fallback and request.fallback_model:
            model = request.fallback_model
            steps.append(Degradation(DegradationStep.FALLBACK_MODEL, f"{why}; served by {model}"))
        return Decision(rung, max_tokens, model=model, steps=tuple(steps))

    def retry_after_ms(self, wait_s: float) -> int:
        # Come back when the backlog should have drained below the refusal rung.
        excess = wait_s - self.config.thresholds_s[Rung.REFUSE - 1] * (1 - self.config.step_down_margin)
        if not math.isfinite(excess):
            excess = self.config.thresholds_s[-1]
        return max(self.config.min_retry_after_ms, math.ceil(excess * 1000))


def fallback_model(model: ModelSpec, catalog: Sequence[ModelSpec], needed_tokens: int) -> str | None:
    """The next smaller tier's model for `model` (the largest tier below its own) that can
    hold `needed_tokens` (prompt + max_tokens); None when the catalog has none."""
    if model.tier not in TIERS:
        return None
    rank = TIERS.index(model.tier)
    smaller = [
        m
        for m in catalog
        if m.kind is model.kind
        and m.tier in TIERS
        and TIERS.index(m.tier) < rank
        and (not m.context_length or m.context_length >= needed_tokens)
    ]
    if not smaller:
        return None
    return max(smaller, key=lambda m: TIERS.index(m.tier)).id
