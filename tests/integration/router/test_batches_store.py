"""The batch job store on a real PostgreSQL (shared by replicas) and on SQLite: claims are
exclusive, leases lapse, results are stored once and only by the job's owner."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.router.auth import Principal
from services.router.batch_store import BatchStore, JobState, create_store_engine
from services.router.batches import principal_from_json, principal_to_json
from services.router.core.rbac import BUILTIN_ROLES, parse_role


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("clean_postgres_url")
    return url


@pytest.fixture
async def replicas(store_url: str) -> AsyncIterator[list[BatchStore]]:
    """Two replicas' stores on one database."""
    stores = [BatchStore(create_store_engine(store_url)) for _ in range(2)]
    await stores[0].create_tables()
    await stores[1].create_tables()  # a second replica starting is harmless
    yield stores
    for store in stores:
        await store.close()


async def submit(store: BatchStore, items: int = 3) -> str:
    batch_id = f"batch-{uuid.uuid4().hex}"
    await store.create(batch_id, "t1", "job", "", [(f"c{i}", b"req") for i in range(items)], now=100.0)
    return batch_id


async def test_one_replica_wins_a_claim_and_the_other_takes_over_when_the_lease_lapses(
    replicas: list[BatchStore],
) -> None:
    a, b = replicas
    batch_id = await submit(a)
    claims = await asyncio.gather(a.claim("A", 1000.0, 10.0), b.claim("B", 1000.0, 10.0))
    winners = [c for c in claims if c is not None and c.batch_id == batch_id]
    assert len(winners) == 1 and winners[0].state is JobState.RUNNING
    owner, other = (a, b) if winners[0].owner == "A" else (b, a)
    other_name = "B" if owner is a else "A"
    owner_name = winners[0].owner

    assert await owner.record(batch_id, 0, owner_name, b"r0", failed=False)
    # Within the lease nobody else gets it; after it, the other replica does.
    assert await other.claim(other_name, 1005.0, 10.0) is None
    taken = await other.claim(other_name, 1011.0, 10.0)
    assert taken is not None and taken.batch_id == batch_id and taken.owner == other_name
    # The old owner's results and renewals are refused from now on.
    assert not await owner.record(batch_id, 1, owner_name, b"late", failed=False)
    assert not await owner.renew(batch_id, owner_name, 2000.0)
    assert [p.index for p in await other.pending(batch_id)] == [1, 2]
    assert await other.record(batch_id, 1, other_name, b"r1", failed=False)
    assert not await other.record(batch_id, 1, other_name, b"twice", failed=False)
    assert await other.finish(batch_id, other_name, 1012.0) is None  # item 2 has no result yet
    assert await other.record(batch_id, 2, other_name, b"r2", failed=True)
    done = await other.finish(batch_id, other_name, 1013.0)
    assert done is not None and done.state is JobState.SUCCEEDED
    assert (done.completed, done.failed, done.finished_at) == (2, 1, 1013.0)
    assert [r for _, r in await a.results(batch_id)] == [b"r0", b"r1", b"r2"]


async def test_cancel_is_final_and_other_tenants_see_nothing(replicas: list[BatchStore]) -> None:
    a, _ = replicas
    batch_id = await submit(a)
    assert await a.get("t2", batch_id) is None
    assert await a.cancel("t2", batch_id, 5.0) is None
    cancelled = await a.cancel("t1", batch_id, 5.0)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert await a.claim("A", 1000.0, 1.0) is None
    assert not await a.record(batch_id, 0, "A", b"r", failed=False)


def test_principal_survives_the_store() -> None:
    custom = parse_role("ml:rpcs=inference,batches:models=m1:priorities=batch")
    for principal in (
        Principal("acme", BUILTIN_ROLES["admin"], "k1"),
        Principal("acme", custom, "k2"),
        None,
    ):
        assert principal_from_json(principal_to_json(principal)) == principal


async def test_results_come_in_pages_and_finished_jobs_are_purged(replicas: list[BatchStore]) -> None:
    a, _ = replicas
    batch_id = await submit(a, items=5)
    running = await submit(a, items=1)
    claimed = await a.claim("A", 1000.0, 60.0)
    assert claimed is not None and claimed.batch_id == batch_id
    for i in (0, 1, 3, 4):
        assert await a.record(batch_id, i, "A", f"r{i}".encode(), failed=False)
    assert await a.results(batch_id, limit=2) == [(0, b"r0"), (1, b"r1")]
    assert await a.results(batch_id, after=1, limit=2) == [(3, b"r3"), (4, b"r4")]
    assert await a.results(batch_id, after=4) == []
    assert await a.record(batch_id, 2, "A", b"r2", failed=False)
    assert await a.finish(batch_id, "A", 2000.0) is not None

    assert await a.purge(finished_before=2000.0) == 0  # not older than the cutoff
    assert await a.purge(finished_before=2000.5) == 1
    assert await a.get("t1", batch_id) is None
    assert await a.results(batch_id) == []
    assert await a.get("t1", running) is not None  # unfinished jobs stay


@pytest.mark.postgres
async def test_replicas_starting_together_create_the_tables_once(empty_postgres_url: str) -> None:
    stores = [BatchStore(create_store_engine(empty_postgres_url)) for _ in range(4)]
    try:
        await asyncio.gather(*(s.create_tables() for s in stores))
        batch_id = await submit(stores[0])
        assert (await stores[3].get("t1", batch_id)) is not None
    finally:
        for store in stores:
            await store.close()
