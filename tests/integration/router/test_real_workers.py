"""Placement with real workers (the packaged model, in this process): session affinity turns a
conversation's earlier turns into prefix-cache hits on the worker that holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.router.real_workers import RealWorker, real_workers, run_conversations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def two_workers() -> AsyncIterator[list[RealWorker]]:
    async with real_workers(2) as workers:
        yield workers


async def test_session_affinity_turns_history_into_prefix_cache_hits(two_workers: list[RealWorker]) -> None:
    # With affinity first: whatever it leaves in the caches can only help the run without.
    # A wide affinity_factor: this measures what staying is worth, not where the default
    # factor (1.5) trades it for balance under a burst (bench/affinity.py shows both).
    shape: dict[str, Any] = {"sessions": 6, "turns": 5, "max_tokens": 12, "affinity_factor": 3.0}
    with_affinity = await run_conversations(two_workers, session_affinity=True, **shape)
    without = await run_conversations(
        two_workers, session_affinity=False, topic_offset=shape["sessions"], **shape
    )
    for run in (with_affinity, without):
        print(
            f"session_affinity={run.session_affinity}: prefix-cache hit ratio {run.hit_ratio:.3f} "
            f"({run.hit_tokens}/{run.prompt_tokens} prompt tokens), {run.moved} of "
            f"{run.turns - shape['sessions']} later turns moved to the other worker"
        )
    # Without affinity a turn stays on its worker only when load happens to put it there.
    assert with_affinity.moved < without.moved
    # The hit ratios are printed, not held to a margin: in this setting (six concurrent
    # sessions, short replies, two workers on two shared cores) runs measured 0.58-0.62 with
    # affinity and 0.52-0.58 without, so only "not worse" is asserted.
    assert with_affinity.hit_ratio >= without.hit_ratio - 0.03
