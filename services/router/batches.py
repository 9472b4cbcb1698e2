"""Offline batch jobs: many Generate requests submitted at once, run at BATCH priority through
the router's normal Generate path (admission queue, placement, sessions, auth checks), with
progress, results in request order, and cancellation.

Every replica runs a small loop that claims jobs from the shared store (see `batch_store`)
and renews its lease while it works; a job whose replica died is taken over when the lease
lapses and continues with the items that have no result yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import Counter

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from services.common.errors import DomainError, InvalidArgument, NotFound, PermissionDenied
from services.common.logs import tenant_var
from services.router import convert
from services.router.auth import (
    DEFAULT_TENANT,
    GENERATE,
    Principal,
    authorize_model,
    current_principal,
    principal_var,
)
from services.router.batch_store import BatchStore, JobRow, JobState, PendingItem, StoreUnavailable
from services.router.config import RouterConfig
from services.router.core.domain import GenerateCall, ReplyChunk
from services.router.core.rbac import AccessRole
from services.router.core.validation import validate_generate
from services.router.pipeline import Pipeline

logger = logging.getLogger(__name__)

# Answers after which an item is tried again later rather than counted as failed.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_STATE_TO_PB = {
    JobState.QUEUED: router_pb2.BATCH_STATE_QUEUED,
    JobState.RUNNING: router_pb2.BATCH_STATE_RUNNING,
    JobState.SUCCEEDED: router_pb2.BATCH_STATE_SUCCEEDED,
    JobState.FAILED: router_pb2.BATCH_STATE_FAILED,
    JobState.CANCELLED: router_pb2.BATCH_STATE_CANCELLED,
}
BATCH_JOBS = Counter(
    "infermesh_router_batch_jobs_total",
    "Batch jobs submitted to this replica, and jobs that ended here by final state.",
    ["event"],
)
BATCH_ITEMS = Counter(
    "infermesh_router_batch_items_total",
    "Batch requests run by this replica, by outcome (ok, or the status code that failed them).",
    ["outcome"],
)
_MAX_CUSTOM_ID_CHARS = 256
_MAX_DISPLAY_NAME_CHARS = 256


# --- who a job runs as ---------------------------------------------------------------------


def principal_to_json(principal: Principal | None) -> str:
    if principal is None:
        return ""
    role = principal.role
    return json.dumps(
        {
            "tenant": principal.tenant,
            "key_prefix": principal.key_prefix,
            "role": {
                "name": role.name,
                "groups": sorted(role.groups),
                "models": None if role.models is None else sorted(role.models),
                "priorities": sorted(role.priorities),
            },
        }
    )


def principal_from_json(text: str) -> Principal | None:
    if not text:
        return None
    data = json.loads(text)
    r = data["role"]
    role = AccessRole(
        r["name"],
        frozenset(r["groups"]),
        None if r["models"] is None else frozenset(r["models"]),
        frozenset(r["priorities"]),
    )
    return Principal(data["tenant"], role, data["key_prefix"])


# --- protobuf at the edge ------------------------------------------------------------------


def job_to_pb(job: JobRow) -> router_pb2.BatchJob:
    out = router_pb2.BatchJob(
        batch_id=job.batch_id,
        display_name=job.display_name,
        state=_STATE_TO_PB[job.state],
        total=job.total,
        completed=job.completed,
        failed=job.failed,
    )
    out.created_at.FromNanoseconds(int(job.created_at * 1e9))
    if job.finished_at is not None:
        out.finished_at.FromNanoseconds(int(job.finished_at * 1e9))
    return out


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (it is read, or deliberately dropped on cancel)."""
    if not future.cancelled():
        future.exception()


class BatchService:
    """Validates and stores submitted jobs, runs the ones this replica claims, answers status."""

    def __init__(
        self,
        config: RouterConfig,
        store: BatchStore,
        pipeline: Pipeline,
        catalog: Callable[[], Any],
        replica_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        # Each item runs through the Generate pipeline: checked and charged like a Generate call.
        self.pipeline = pipeline
        self.catalog = catalog
        self.replica_id = replica_id
        self.clock = clock
        self.limits = config.batch
        self._purged_at = float("-inf")
        self._tables = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Never fails the router's start: without its store, batch calls answer UNAVAILABLE
        and the tables are created once the store answers."""
        try:
            await self._ensure_tables()
        except StoreUnavailable as exc:
            logger.warning("%s; batch jobs wait for it", exc.message)
        self._loop_task = asyncio.create_task(self._claim_loop(), name="batch-claims")

    async def _ensure_tables(self) -> None:
        if not self._tables:
            await self.store.create_tables()
            self._tables = True

    async def stop(self) -> None:
        """Stop running jobs here; their leases lapse and another replica (or a restart) resumes them."""
        tasks = [t for t in (self._loop_task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    def _forget(self, batch_id: str, _task: object) -> None:
        self._running.pop(batch_id, None)
        self._wake.set()  # a slot is free: a queued job may start now

    async def _purge(self) -> None:
        """Drop finished jobs past their retention, at most once an hour per replica."""
        days = self.limits.retention_days
        now = self.clock()
        if not days or now - self._purged_at < 3600:
            return
        self._purged_at = now
        gone = await self.store.purge(now - days * 86400)
        if gone:
            logger.info("purged %d batch jobs finished over %d days ago", gone, days)

    async def _claim_loop(self) -> None:
        interval = self.limits.lease_s / 3
        while True:
            # Cleared before looking, so a job submitted meanwhile wakes the next look.
            self._wake.clear()
            try:
                await self._ensure_tables()
                while len(self._running) < self.limits.jobs_per_replica:
                    job = await self.store.claim(self.replica_id, self.clock(), self.limits.lease_s)
                    if job is None:
                        break
                    task = asyncio.create_task(self._run(job), name=f"batch-{job.batch_id}")
                    self._running[job.batch_id] = task
                    task.add_done_callback(functools.partial(self._forget, job.batch_id))
                await self._purge()
            except StoreUnavailable as exc:
                logger.warning("%s; claiming batch jobs again later", exc.message)
            except Exception:
                logger.exception("claiming batch jobs failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)

    # --- API ------------------------------------------------------------------------------

    async def submit(self, request: router_pb2.SubmitBatchRequest, tenant: str) -> router_pb2.BatchJob:
        items = list(request.items)
        if not items:
            raise InvalidArgument("items", "must not be empty")
        if len(items) > self.limits.max_items:
            raise InvalidArgument("items", f"at most {self.limits.max_items} per batch, got {len(items)}")
        if len(request.display_name) > _MAX_DISPLAY_NAME_CHARS:
            raise InvalidArgument("display_name", f"must be at most {_MAX_DISPLAY_NAME_CHARS} characters")
        principal = current_principal()
        if principal is not None and (why := principal.role.denies_priority("batch")):
            raise PermissionDenied(f"{why}: batch requests run at BATCH priority")
        seen: set[str] = set()
        stored: list[tuple[str, bytes]] = []
        for i, item in enumerate(items):
            custom_id = item.custom_id or str(i)
            if len(custom_id) > _MAX_CUSTOM_ID_CHARS:
                raise InvalidArgument(f"items[{i}].custom_id", f"at most {_MAX_CUSTOM_ID_CHARS} characters")
            if custom_id in seen:
                raise InvalidArgument(f"items[{i}].custom_id", f"{custom_id!r} is used twice")
            seen.add(custom_id)
            self._check_item(i, item.request)
            stored.append((custom_id, item.request.SerializeToString(deterministic=True)))
        batch_id = f"batch-{uuid.uuid4().hex}"
        job = await self.store.create(
            batch_id, tenant, request.display_name, principal_to_json(principal), stored, self.clock()
        )
        logger.info("batch %s submitted with %d items", batch_id, job.total)
        BATCH_JOBS.labels("submitted").inc()
        self._wake.set()
        return job_to_pb(job)

    def _check_item(self, index: int, request: router_pb2.GenerateRequest) -> None:
        """Refuse bad items at submission, naming them, rather than failing them one by one later."""
        try:
            resolved = validate_generate(
                convert.generate_from_pb(request),
                self.catalog(),
                self.config.default_chat_model,
                self.pipeline.limits,
            )
            authorize_model(resolved.model.id)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"items[{index}].request.{exc.field}", exc.message.split(": ", 1)[-1]
            ) from None

    async def get(self, batch_id: str, tenant: str) -> router_pb2.BatchJob:
        return job_to_pb(await self._job(batch_id, tenant))

    async def _job(self, batch_id: str, tenant: str) -> JobRow:
        if not batch_id:
            raise InvalidArgument("batch_id", "must not be empty")
        job = await self.store.get(tenant, batch_id)
        if job is None:
            raise NotFound(f"batch {batch_id!r} not found")
        return job

    async def list_jobs(
        self, request: router_pb2.ListBatchesRequest, tenant: str
    ) -> router_pb2.ListBatchesResponse:
        size = min(request.page_size or 50, 1000)
        # isdigit alone takes "²" and other digits int() refuses.
        if request.page_token and not (request.page_token.isascii() and request.page_token.isdigit()):
            raise InvalidArgument("page_token", "not a token this router gave out")
        offset = int(request.page_token or 0)
        jobs = await self.store.list_jobs(tenant, size + 1, offset)
        more = len(jobs) > size
        return router_pb2.ListBatchesResponse(
            jobs=[job_to_pb(j) for j in jobs[:size]], next_page_token=str(offset + size) if more else ""
        )

    async def results(self, batch_id: str, tenant: str) -> AsyncIterator[router_pb2.BatchResult]:
        job = await self._job(batch_id, tenant)
        after = -1
        while page := await self.store.results(job.batch_id, after):
            for _, raw in page:
                yield router_pb2.BatchResult.FromString(raw)
            after = page[-1][0]

    async def cancel(self, batch_id: str, tenant: str) -> router_pb2.BatchJob:
        before = await self._job(batch_id, tenant)
        job = await self.store.cancel(tenant, batch_id, self.clock())
        assert job is not None
        if not before.state.done and job.state is JobState.CANCELLED:
            BATCH_JOBS.labels(JobState.CANCELLED.value).inc()
        task = self._running.get(batch_id)
        if task is not None:
            task.cancel()
        logger.info("batch %s: %s", batch_id, job.state.value)
        return job_to_pb(job)

    # --- running a job --------------------------------------------------------------------

    async def _run(self, job: JobRow) -> None:
        principal = principal_from_json(job.principal)
        principal_var.set(principal)
        tenant_var.set(job.tenant)
        pending = await self.store.pending(job.batch_id)
        logger.info("batch %s: running %d of %d items here", job.batch_id, len(pending), job.total)
        queue: asyncio.Queue[PendingItem] = asyncio.Queue()
        for item in pending:
            queue.put_nowait(item)
        lost = asyncio.Event()  # cancelled or taken over: stop at once
        workers = [
            asyncio.create_task(self._work(job, queue, lost))
            for _ in range(min(self.limits.concurrency, len(pending)) or 0)
        ]
        heartbeat = asyncio.create_task(self._heartbeat(job.batch_id, lost))
        everything: asyncio.Future[Any] = asyncio.gather(*workers)
        everything.add_done_callback(_retrieve)
        lost_wait: asyncio.Future[Any] = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait([everything, lost_wait], return_when=asyncio.FIRST_COMPLETED)
            if everything.done() and everything.exception() is not None:
                # E.g. the store went away: the lease lapses and the job is claimed again.
                logger.error("batch %s interrupted: %r", job.batch_id, everything.exception())
                return
        finally:
            lost_wait.cancel()
            for task in (*workers, heartbeat):
                task.cancel()
            await asyncio.gather(*workers, heartbeat, return_exceptions=True)
        if lost.is_set():
            logger.info("batch %s stopped here (cancelled or taken over)", job.batch_id)
            return
        done = await self.store.finish(job.batch_id, self.replica_id, self.clock())
        if done is not None:
            BATCH_JOBS.labels(done.state.value).inc()
            logger.info(
                "batch %s %s: %d completed, %d failed",
                job.batch_id,
                done.state.value,
                done.completed,
                done.failed,
            )

    async def _heartbeat(self, batch_id: str, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.limits.lease_s / 3)
            try:
                if not await self.store.renew(batch_id, self.replica_id, self.clock() + self.limits.lease_s):
                    lost.set()
                    return
            except Exception:
                logger.exception("batch %s: lease renewal failed", batch_id)

    async def _work(self, job: JobRow, queue: asyncio.Queue[PendingItem], lost: asyncio.Event) -> None:
        while not queue.empty():
            item = queue.get_nowait()
            result = await self._execute(job.batch_id, item)
            BATCH_ITEMS.labels(result.error_code or "ok").inc()
            stored = await self.store.record(
                job.batch_id, item.index, self.replica_id, result.SerializeToString(), bool(result.error_code)
            )
            if not stored:
                lost.set()
                return

    def _generate(self, request: router_pb2.GenerateRequest) -> AsyncIterator[ReplyChunk]:
        principal = current_principal()
        call = GenerateCall(
            params=convert.generate_from_pb(request),
            tenant=DEFAULT_TENANT if principal is None else principal.tenant,
            key_prefix="" if principal is None else principal.key_prefix,
            method=GENERATE,
            time_remaining=self.limits.item_timeout_s,
        )
        return self.pipeline.generate(call)

    async def _execute(self, batch_id: str, item: PendingItem) -> router_pb2.BatchResult:
        """One item through Generate; overload and unavailability are waited out, up to item_attempts."""
        request = router_pb2.GenerateRequest.FromString(item.request)
        request.priority = common_pb2.PRIORITY_BATCH
        request.request_id = f"{batch_id}-{item.index}"
        result = router_pb2.BatchResult(custom_id=item.custom_id, index=item.index)
        delay_s = 0.5
        for attempt in range(1, self.limits.item_attempts + 1):
            parts: list[str] = []
            try:
                async for chunk in self._generate(request):
                    parts.append(chunk.text)
                    if chunk.finish is not None:
                        result.finish_reason = convert.finish_to_pb(chunk.finish)
                        if chunk.usage is not None:
                            result.usage.CopyFrom(convert.usage_to_pb(chunk.usage))
                result.text = "".join(parts)
                return result
            except DomainError as exc:
                code, message, pushback = exc.code, exc.message, getattr(exc, "retry_after_ms", None)
            except grpc.aio.AioRpcError as exc:
                code, message, pushback = exc.code(), exc.details() or "", None
            if code not in _TRANSIENT or attempt == self.limits.item_attempts:
                break
            wait_s = pushback / 1000 if pushback else delay_s
            logger.info(
                "batch item %s-%d: %s, trying again in %.1fs", batch_id, item.index, code.name, wait_s
            )
            await asyncio.sleep(wait_s)
            delay_s = min(delay_s * 2, 30.0)
        result.error_code = code.name
        result.error_message = message
        return result
