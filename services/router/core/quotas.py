"""Token quotas per tenant: the arithmetic, free of Redis and asyncio.

Three fixed-window counters per tenant: requests in the current second, tokens in the
current minute, tokens in the current budget period. A request reserves `prompt + max_tokens`
before it runs and is refused when any counter would pass its limit; when it ends the
reservation is settled to the tokens really used. So a tenant can never be over its limit by
more than the estimation error of one request's prompt, and never by its max_tokens.
The same decision runs in a Redis script (shared by every router replica) and in the local
fallback below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

REQUESTS = "requests_per_s"
TOKENS = "tokens_per_minute"
BUDGET = "token_budget"
KINDS = (REQUESTS, TOKENS, BUDGET)


class QuotaSpecError(ValueError):
    """A per-tenant quota override that cannot be parsed."""


@dataclass(frozen=True)
class QuotaLimits:
    requests_per_s: int = 0  # 0: no limit
    tokens_per_minute: int = 0
    token_budget: int = 0
    budget_period_s: int = 86_400

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_s or self.tokens_per_minute or self.token_budget)

    def limit(self, kind: str) -> int:
        return int(getattr(self, kind))

    def window_s(self, kind: str) -> int:
        return {REQUESTS: 1, TOKENS: 60, BUDGET: self.budget_period_s}[kind]


@dataclass(frozen=True)
class Window:
    """One counter: its name (tenant, kind, window index), limit, what this request adds."""

    kind: str
    key: str
    limit: int
    add: int
    ends_at: float  # unix seconds when the window rolls over
    ttl_ms: int


@dataclass(frozen=True)
class Refusal:
    kind: str
    limit: int
    used: int
    asked: int
    retry_after_ms: int

    def message(self, tenant: str) -> str:
        unit = "requests" if self.kind == REQUESTS else "tokens"
        if self.asked > self.limit:
            return (
                f"quota {self.kind}={self.limit} of tenant {tenant!r}: one request of {self.asked} {unit} "
                "can never fit; lower max_tokens or the prompt"
            )
        return (
            f"quota {self.kind}={self.limit} of tenant {tenant!r} reached ({self.used} {unit} used, "
            f"this request needs {self.asked}); retry in {self.retry_after_ms} ms"
        )


def windows(tenant: str, limits: QuotaLimits, tokens: int, now: float) -> list[Window]:
    """The counters a request of `tokens` touches at unix time `now` (limits of 0 left out)."""
    out = []
    for kind in KINDS:
        limit = limits.limit(kind)
        if limit <= 0:
            continue
        size = limits.window_s(kind)
        index = int(now // size)
        ends_at = (index + 1) * size
        # Kept a little past the window's end so a late settle still finds the key.
        ttl_ms = int((ends_at - now + 60) * 1000)
        out.append(
            Window(
                kind, f"{tenant}:{kind}:{index}", limit, 1 if kind == REQUESTS else tokens, ends_at, ttl_ms
            )
        )
    return out


def decide(used: Mapping[str, int], wanted: Iterable[Window], now: float) -> Refusal | None:
    """Refused when any counter plus this request would pass its limit; `used` maps keys to counts."""
    for w in wanted:
        current = used.get(w.key, 0)
        if current + w.add > w.limit:
            retry_ms = max(1, int((w.ends_at - now) * 1000))
            return Refusal(w.kind, w.limit, current, w.add, retry_ms)
    return None


@dataclass
class LocalCounters:
    """The fallback when Redis is away: the same windows, counted in this process only."""

    counts: dict[str, int] = field(default_factory=dict)
    expiry: dict[str, float] = field(default_factory=dict)

    def _purge(self, now: float) -> None:
        for key in [k for k, at in self.expiry.items() if at <= now]:
            self.counts.pop(key, None)
            self.expiry.pop(key, None)

    def reserve(self, wanted: list[Window], now: float) -> Refusal | None:
        self._purge(now)
        refusal = decide(self.counts, wanted, now)
        if refusal is None:
            for w in wanted:
                self.counts[w.key] = self.counts.get(w.key, 0) + w.add
                self.expiry[w.key] = now + w.ttl_ms / 1000
        return refusal

    def adjust(self, keys: Iterable[str], delta: int) -> None:
        for key in keys:
            if key in self.counts:
                self.counts[key] = max(0, self.counts[key] + delta)


def parse_override(spec: str, base: QuotaLimits) -> tuple[str, QuotaLimits]:
    """`tenant:tokens_per_minute=1000:token_budget=50000:requests_per_s=5` over `base`."""
    tenant, *parts = [p.strip() for p in spec.split(":")]
    if not tenant:
        raise QuotaSpecError(f"quota {spec!r}: needs a tenant name first")
    limits = base
    for part in parts:
        key, sep, raw = part.partition("=")
        if not sep or key not in (*KINDS, "budget_period_s"):
            raise QuotaSpecError(
                f"quota {spec!r}: {part!r} must read key=value, key one of "
                f"{', '.join(KINDS)}, budget_period_s"
            )
        try:
            value = int(raw)
        except ValueError:
            raise QuotaSpecError(f"quota {spec!r}: {key}={raw!r} must be an integer") from None
        if value < 0 or (key == "budget_period_s" and value < 1):
            raise QuotaSpecError(f"quota {spec!r}: {key}={value} out of range")
        limits = replace(limits, **{key: value})
    return tenant, limits


def build_limits(base: QuotaLimits, overrides: Iterable[str]) -> dict[str, QuotaLimits]:
    return dict(parse_override(spec, base) for spec in overrides)
