"""Token quotas shared by every router replica through Redis (one atomic script per decision),
with the local counters of `quotas` standing in while Redis is away; each decision taken
without Redis is counted in `infermesh_router_quota_fallback_total`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from services.common.errors import ResourceExhausted
from services.router.core.quotas import LocalCounters, QuotaLimits, Refusal, Window, windows

logger = logging.getLogger(__name__)

FALLBACKS = Counter(
    "infermesh_router_quota_fallback_total",
    "Quota decisions taken with this replica's local counters because Redis did not answer.",
)
REFUSALS = Counter(
    "infermesh_router_quota_refusals_total", "Requests refused by a tenant quota.", ["tenant", "quota"]
)

# KEYS: the windows' keys. ARGV: n, then limit, add, ttl_ms of each window.
# Returns {0} when admitted (every counter incremented), else {i, used} of the first refusal.
_RESERVE = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + tonumber(ARGV[3 * i]) > tonumber(ARGV[3 * i - 1]) then
    return {i, used}
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i])
  redis.call('PEXPIRE', KEYS[i], ARGV[3 * i + 1])
end
return {0, 0}
"""
# Settles a reservation: adds ARGV[1] (negative: a refund) to each key that still exists.
_ADJUST = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], ARGV[1])
    if v < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
"""


@dataclass
class Reservation:
    tenant: str
    reserved: int
    token_keys: list[str]  # the token windows (not the request counter), to settle
    local: bool  # taken by the local counters


class Quotas:
    def __init__(
        self,
        default: QuotaLimits,
        per_tenant: Mapping[str, QuotaLimits],
        *,
        redis_url: str = "",
        prefix: str = "infermesh:quota",
        timeout_s: float = 0.1,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.default = default
        self.per_tenant = dict(per_tenant)
        self.prefix = prefix
        self.local = LocalCounters()
        self.clock = clock
        self._retry_s = retry_s
        self._down_until = 0.0
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(
                redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
            self._reserve = self._redis.register_script(_RESERVE)
            self._adjust = self._redis.register_script(_ADJUST)

    @property
    def enabled(self) -> bool:
        return self.default.enabled or any(limits.enabled for limits in self.per_tenant.values())

    def limits(self, tenant: str) -> QuotaLimits:
        return self.per_tenant.get(tenant, self.default)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _redis_usable(self, now: float) -> bool:
        return self._redis is not None and now >= self._down_until

    def _redis_failed(self, exc: Exception, now: float) -> None:
        if now >= self._down_until:
            logger.warning("quota store unavailable (%s); counting locally", type(exc).__name__)
        self._down_until = now + self._retry_s

    async def reserve(self, tenant: str, tokens: int) -> Reservation | None:
        """Reserve `tokens` (and one request) for `tenant`, or raise RESOURCE_EXHAUSTED with
        a pushback until the refusing window rolls over. None when the tenant has no quota."""
        limits = self.limits(tenant)
        if not limits.enabled:
            return None
        now = self.clock()
        wanted = windows(tenant, limits, tokens, now)
        refusal: Refusal | None
        local = True
        if self._redis_usable(now):
            try:
                refusal = await self._reserve_redis(wanted, now)
                local = False
            except Exception as exc:  # any Redis failure: fall back, never fail the request
                self._redis_failed(exc, now)
        if local:
            if self._redis is not None:
                FALLBACKS.inc()
            refusal = self.local.reserve(wanted, now)
        if refusal is not None:
            REFUSALS.labels(tenant, refusal.kind).inc()
            raise ResourceExhausted(refusal.message(tenant), refusal.retry_after_ms)
        keys = [w.key for w in wanted if w.kind != "requests_per_s"]
        return Reservation(tenant, tokens, keys, local)

    async def _reserve_redis(self, wanted: list[Window], now: float) -> Refusal | None:
        args: list[int] = [len(wanted)]
        for w in wanted:
            args += [w.limit, w.add, w.ttl_ms]
        index, used = await self._reserve(keys=[f"{self.prefix}:{w.key}" for w in wanted], args=args)
        if int(index) == 0:
            return None
        w = wanted[int(index) - 1]
        return Refusal(w.kind, w.limit, int(used), w.add, max(1, int((w.ends_at - now) * 1000)))

    async def settle(self, reservation: Reservation | None, used_tokens: int) -> None:
        """Count what the request really used instead of what it reserved."""
        if reservation is None or not reservation.token_keys:
            return
        delta = used_tokens - reservation.reserved
        if delta == 0:
            return
        if not reservation.local and self._redis_usable(self.clock()):
            try:
                await self._adjust(keys=[f"{self.prefix}:{k}" for k in reservation.token_keys], args=[delta])
                return
            except Exception as exc:
                self._redis_failed(exc, self.clock())
        self.local.adjust(reservation.token_keys, delta)
