"""Where batch jobs live: a SQL store (SQLAlchemy async) shared by the router replicas.

In memory (SQLite) by default, so a job dies with its replica; with a Postgres URL (or a
SQLite file) jobs and results survive restarts, any replica answers status and results, and a
job whose runner stopped renewing its lease is taken over by another replica. Requests and
results are kept as serialized protobuf messages: the store never looks inside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from services.common.errors import Unavailable

IN_MEMORY = "sqlite+aiosqlite://"
_TABLES_LOCK_KEY = 0x1A7E_BA7C  # Postgres advisory lock taken while the tables are created

_metadata = sa.MetaData()
jobs_table = sa.Table(
    "router_batch_jobs",
    _metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False, index=True),
    sa.Column("display_name", sa.String(256), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    # The replica running the job and until when its claim holds.
    sa.Column("owner", sa.String(128), nullable=False, default=""),
    sa.Column("lease_until", sa.Float, nullable=False, default=0.0),
    # Who submitted it (tenant and role, as JSON), so a replica taking over runs it as them.
    sa.Column("principal", sa.Text, nullable=False, default=""),
)
items_table = sa.Table(
    "router_batch_items",
    _metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("router_batch_jobs.batch_id"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(256), nullable=False),
    sa.Column("request", sa.LargeBinary, nullable=False),
    sa.Column("result", sa.LargeBinary, nullable=True),
)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in _DONE


_DONE = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class JobRow:
    batch_id: str
    tenant: str
    display_name: str
    state: JobState
    total: int
    completed: int
    failed: int
    created_at: float
    finished_at: float | None
    owner: str
    principal: str


@dataclass(frozen=True)
class PendingItem:
    index: int
    custom_id: str
    request: bytes


def _job(row: Any) -> JobRow:
    return JobRow(
        row.batch_id,
        row.tenant,
        row.display_name,
        JobState(row.state),
        row.total,
        row.completed,
        row.failed,
        row.created_at,
        row.finished_at,
        row.owner,
        row.principal,
    )


class StoreUnavailable(Unavailable):
    """The batch store could not be reached or did not answer."""


def create_store_engine(url: str, timeout_s: float = 5.0) -> AsyncEngine:
    if url == IN_MEMORY:
        # One connection shared by every task: each new connection would be a new, empty database.
        return create_async_engine(url, poolclass=StaticPool)
    if url.startswith("postgresql"):
        # Bounded waits: a store that is away answers UNAVAILABLE rather than holding calls.
        return create_async_engine(
            url, pool_pre_ping=True, pool_timeout=timeout_s, connect_args={"timeout": timeout_s}
        )
    return create_async_engine(url, pool_pre_ping=True)


class BatchStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # SQLite takes one writer at a time, and the in-memory database is a single shared
        # connection: calls from concurrent tasks take turns.
        self._turns = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        async with self._unavailable(), self._turn(), self.engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        async with self._unavailable(), self._turn(), self.engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _unavailable(self) -> AsyncIterator[None]:
        try:
            yield
        except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the batch store is unavailable ({type(exc).__name__})") from exc

    def _turn(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._turns if self._turns is not None else contextlib.nullcontext()

    async def create_tables(self) -> None:
        async with self._begin() as conn:
            if self.engine.dialect.name == "postgresql":
                # Replicas starting together: one creates the tables, the others then see them.
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _TABLES_LOCK_KEY})
            await conn.run_sync(_metadata.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    async def create(
        self,
        batch_id: str,
        tenant: str,
        display_name: str,
        principal: str,
        items: Sequence[tuple[str, bytes]],
        now: float,
    ) -> JobRow:
        values = {
            "batch_id": batch_id,
            "tenant": tenant,
            "display_name": display_name,
            "state": JobState.QUEUED.value,
            "total": len(items),
            "completed": 0,
            "failed": 0,
            "created_at": now,
            "finished_at": None,
            "owner": "",
            "lease_until": 0.0,
            "principal": principal,
        }
        async with self._begin() as conn:
            await conn.execute(jobs_table.insert().values(**values))
            await conn.execute(
                items_table.insert(),
                [
                    {"batch_id": batch_id, "idx": i, "custom_id": cid, "request": req, "result": None}
                    for i, (cid, req) in enumerate(items)
                ],
            )
        return JobRow(
            batch_id, tenant, display_name, JobState.QUEUED, len(items), 0, 0, now, None, "", principal
        )

    async def get(self, tenant: str, batch_id: str) -> JobRow | None:
        query = jobs_table.select().where(jobs_table.c.batch_id == batch_id, jobs_table.c.tenant == tenant)
        async with self._connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _job(row)

    async def list_jobs(self, tenant: str, limit: int, offset: int) -> list[JobRow]:
        query = (
            jobs_table.select()
            .where(jobs_table.c.tenant == tenant)
            .order_by(jobs_table.c.created_at.desc(), jobs_table.c.batch_id)
            .limit(limit)
            .offset(offset)
        )
        async with self._connect() as conn:
            return [_job(row) for row in await conn.execute(query)]

    async def claim(self, owner: str, now: float, lease_s: float) -> JobRow | None:
        """Take the oldest job nobody runs (never claimed, or its runner's lease lapsed)."""
        free = sa.and_(
            jobs_table.c.state.in_(_ACTIVE),
            sa.or_(jobs_table.c.owner == "", jobs_table.c.lease_until < now),
        )
        async with self._begin() as conn:
            candidates = await conn.execute(
                sa.select(jobs_table.c.batch_id).where(free).order_by(jobs_table.c.created_at).limit(4)
            )
            for (batch_id,) in candidates.all():
                # Conditional update: of two replicas racing for the job, one wins.
                taken = await conn.execute(
                    jobs_table.update()
                    .where(jobs_table.c.batch_id == batch_id, free)
                    .values(owner=owner, lease_until=now + lease_s, state=JobState.RUNNING.value)
                )
                if taken.rowcount == 1:
                    row = (
                        await conn.execute(jobs_table.select().where(jobs_table.c.batch_id == batch_id))
                    ).one()
                    return _job(row)
        return None

    async def renew(self, batch_id: str, owner: str, lease_until: float) -> bool:
        """Extend the claim; False when the job was cancelled or taken over meanwhile."""
        async with self._begin() as conn:
            result = await conn.execute(
                jobs_table.update()
                .where(
                    jobs_table.c.batch_id == batch_id,
                    jobs_table.c.owner == owner,
                    jobs_table.c.state == JobState.RUNNING.value,
                )
                .values(lease_until=lease_until)
            )
        return bool(result.rowcount == 1)

    async def pending(self, batch_id: str) -> list[PendingItem]:
        query = (
            sa.select(items_table.c.idx, items_table.c.custom_id, items_table.c.request)
            .where(items_table.c.batch_id == batch_id, items_table.c.result.is_(None))
            .order_by(items_table.c.idx)
        )
        async with self._connect() as conn:
            return [PendingItem(r.idx, r.custom_id, r.request) for r in await conn.execute(query)]

    async def record(self, batch_id: str, index: int, owner: str, result: bytes, failed: bool) -> bool:
        """Store one item's result and count it; False (nothing stored) if the job is no
        longer this runner's (cancelled, or taken over)."""
        counter = jobs_table.c.failed if failed else jobs_table.c.completed
        async with self._begin() as conn:
            stored = await conn.execute(
                items_table.update()
                .where(
                    items_table.c.batch_id == batch_id,
                    items_table.c.idx == index,
                    items_table.c.result.is_(None),
                    sa.exists().where(
                        jobs_table.c.batch_id == batch_id,
                        jobs_table.c.owner == owner,
                        jobs_table.c.state == JobState.RUNNING.value,
                    ),
                )
                .values(result=result)
            )
            if stored.rowcount != 1:
                return False
            await conn.execute(
                jobs_table.update().where(jobs_table.c.batch_id == batch_id).values({counter: counter + 1})
            )
        return True

    async def finish(self, batch_id: str, owner: str, now: float) -> JobRow | None:
        """End a job whose items all have results: SUCCEEDED, or FAILED when every item failed."""
        async with self._begin() as conn:
            row = (await conn.execute(jobs_table.select().where(jobs_table.c.batch_id == batch_id))).one()
            job = _job(row)
            if job.owner != owner or job.state is not JobState.RUNNING:
                return None
            if job.completed + job.failed < job.total:
                return None  # some results were not stored: the job stays claimable
            state = JobState.FAILED if job.total and job.failed == job.total else JobState.SUCCEEDED
            await conn.execute(
                jobs_table.update()
                .where(jobs_table.c.batch_id == batch_id)
                .values(state=state.value, finished_at=now, lease_until=0.0)
            )
        return await self.get(job.tenant, batch_id)

    async def cancel(self, tenant: str, batch_id: str, now: float) -> JobRow | None:
        """CANCELLED unless already finished; the job as it then stands (None: no such job)."""
        async with self._begin() as conn:
            await conn.execute(
                jobs_table.update()
                .where(
                    jobs_table.c.batch_id == batch_id,
                    jobs_table.c.tenant == tenant,
                    jobs_table.c.state.in_(_ACTIVE),
                )
                .values(state=JobState.CANCELLED.value, finished_at=now)
            )
        return await self.get(tenant, batch_id)

    async def results(self, batch_id: str, after: int = -1, limit: int = 500) -> list[tuple[int, bytes]]:
        """(index, result) of finished items past index `after`, in order: one page."""
        query = (
            sa.select(items_table.c.idx, items_table.c.result)
            .where(
                items_table.c.batch_id == batch_id,
                items_table.c.idx > after,
                items_table.c.result.is_not(None),
            )
            .order_by(items_table.c.idx)
            .limit(limit)
        )
        async with self._connect() as conn:
            return [(r.idx, r.result) for r in await conn.execute(query)]

    async def purge(self, finished_before: float) -> int:
        """Delete jobs that ended before this time, with their items; how many jobs went."""
        old = sa.select(jobs_table.c.batch_id).where(
            jobs_table.c.state.not_in(_ACTIVE), jobs_table.c.finished_at < finished_before
        )
        async with self._begin() as conn:
            await conn.execute(items_table.delete().where(items_table.c.batch_id.in_(old)))
            gone = await conn.execute(jobs_table.delete().where(jobs_table.c.batch_id.in_(old)))
        return int(gone.rowcount or 0)
