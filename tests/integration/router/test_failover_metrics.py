"""A mid-stream failover is counted in the router's metrics by reason, and as a degradation."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from tests.integration.router.helpers import text_of
from tests.integration.router.test_failover import EXPECTED, pair, started_on_a


def _failovers() -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for family in REGISTRY.collect()
        if family.name == "infermesh_router_failovers"
        for s in family.samples
        if s.name.endswith("_total") and s.labels.get("kind") == "worker"
    }


def _degraded_failovers() -> float:
    return REGISTRY.get_sample_value("infermesh_router_requests_degraded_total", {"step": "failover"}) or 0.0


async def test_worker_gone_mid_stream_counts_one_failover_and_one_degraded_answer() -> None:
    before, degraded_before = _failovers(), _degraded_failovers()
    async with pair() as (workers, servers, stub):
        _, task = await started_on_a(workers, stub)
        await asyncio.sleep(0.1)
        await servers[0].stop(0)
        assert text_of(await task) == EXPECTED
    after = _failovers()
    grown = {
        reason: n - before.get(reason, 0.0) for reason, n in after.items() if n > before.get(reason, 0.0)
    }
    assert sum(grown.values()) == 1, grown
    assert not any(reason.endswith("_before_first_token") for reason in grown)
    assert _degraded_failovers() - degraded_before == 1
