"""Audit events from the router (denials, refusals, admin calls) sent to the session
service's append-only log in the background, so a request never waits on the audit write.

Events carry tenant, key prefix, method, trace id and a short detail: never message content,
never keys. While the session service is away events wait in a bounded buffer; the oldest
are dropped (and counted) past its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import grpc

from infermesh.session.v1 import governance_pb2, governance_pb2_grpc
from services.common.logs import request_id_var, trace_id_var
from services.common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

AUTH_FAILED = "AUTH_FAILED"
PERMISSION_DENIED = "PERMISSION_DENIED"
QUOTA_REFUSED = "QUOTA_REFUSED"
GUARDRAIL_BLOCKED = "GUARDRAIL_BLOCKED"
ADMIN_CALL = "ADMIN_CALL"
ERASURE = "ERASURE"
EXPORT = "EXPORT"


class AuditSink:
    def __init__(
        self,
        stub: governance_pb2_grpc.GovernanceStub | None,
        *,
        flush_interval_s: float = 0.5,
        max_buffer: int = 10_000,
        batch: int = 500,
        timeout_s: float = 5.0,
    ) -> None:
        self._stub = stub
        self._buffer: deque[governance_pb2.AuditEvent] = deque(maxlen=max_buffer)
        self._interval_s = flush_interval_s
        self._batch = batch
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0

    def record(self, event: str, tenant: str, key_prefix: str, method: str, detail: str = "") -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        pb = governance_pb2.AuditEvent(
            event=event,
            tenant=tenant,
            key_prefix=key_prefix,
            trace_id=trace_id_var.get() or request_id_var.get(),
            method=method,
            detail=detail[:1024],
        )
        pb.time.GetCurrentTime()
        self._buffer.append(pb)
        logger.info(
            "audit %s", event, extra={"audit_tenant": tenant, "key_prefix": key_prefix, "method": method}
        )
        if len(self._buffer) >= self._batch:
            self._wake.set()

    def start(self) -> None:
        if self._stub is not None and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.flush()

    async def flush(self) -> bool:
        """Send what is buffered; False when the session service did not take it."""
        while self._buffer and self._stub is not None:
            events = [self._buffer[i] for i in range(min(self._batch, len(self._buffer)))]
            try:
                await self._stub.AppendAudit(
                    governance_pb2.AppendAuditRequest(events=events), timeout=self._timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "audit events not sent yet (%s); %d buffered", exc.code().name, len(self._buffer)
                )
                return False
            for _ in events:
                self._buffer.popleft()
            self.sent += len(events)
        return True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            await self.flush()
