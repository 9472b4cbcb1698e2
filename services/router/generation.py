"""The Generate flow: validate, prepend session history, place on a worker, relay the
stream as it comes, and record the turn when the stream finishes normally."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from infermesh.router.v1 import router_pb2
from services.common.errors import FailedPrecondition, Unavailable
from services.common.logs import request_id_var, tenant_var
from services.common.telemetry import span
from services.router import convert
from services.router.admission import Admission, Capacity
from services.router.auth import authorize_model
from services.router.config import RouterConfig
from services.router.domain import (
    Degradation,
    DegradationStep,
    EndpointKind,
    GenerateParams,
    HistoryMessage,
)
from services.router.endpoints import EndpointMonitor, Placement
from services.router.history import merge_history, turns_to_append
from services.router.placement import Ask, HardwareNeeds
from services.router.queues import QueueConfig, QueuedRequest, create_request_queue, effective_priority
from services.router.sessions import SessionClient, SessionUnavailable
from services.router.tenancy import tenant_of
from services.router.validation import GenerateLimits, time_budget, validate_generate

logger = logging.getLogger(__name__)

NO_SESSION_SERVICE = "no session service is configured on this router (session_address is empty)"


class _Deadline:
    """The request's time budget as a point on the loop clock; None means unbounded."""

    def __init__(self, budget_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._at = None if budget_s is None else loop.time() + budget_s

    def remaining(self) -> float | None:
        return None if self._at is None else max(0.0, self._at - self._loop.time())


@dataclass
class _Turn:
    """One Generate call's session context, filled in as the call proceeds."""

    params: GenerateParams
    request_id: str
    tenant: str
    deadline: _Deadline
    window: list[HistoryMessage] = field(default_factory=list)
    degraded: list[Degradation] = field(default_factory=list)
    record: bool = False  # the window was read, so the turn is appended at the end


class Generation:
    def __init__(
        self, config: RouterConfig, endpoints: EndpointMonitor, sessions: SessionClient | None
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.sessions = sessions
        self.limits = GenerateLimits(
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            max_stop_sequences=config.max_stop_sequences,
            max_request_id_chars=config.max_request_id_chars,
        )
        queue = create_request_queue(config.queue_policy, QueueConfig(aging_s=config.queue_aging_s))
        self.admission = Admission(queue, self._capacity, endpoints.clock)

    def _capacity(self) -> Capacity:
        registry = self.endpoints.registry
        workers, tokens_per_s = registry.throughput(
            EndpointKind.WORKER, self.endpoints.clock(), self.config.prior_decode_tokens_per_s
        )
        return Capacity(workers * self.config.max_streams_per_worker, tokens_per_s)

    async def stream(
        self, req: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        params = convert.generate_from_pb(req)
        request_id = params.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        resolved = validate_generate(
            params, self.endpoints.registry.catalog(), self.config.default_chat_model, self.limits
        )
        authorize_model(resolved.model.id)
        deadline = _Deadline(time_budget(context.time_remaining(), params.deadline, time.time()))
        with span("auth"):
            tenant = tenant_of(context)
        tenant_var.set(tenant)
        turn = _Turn(params, request_id, tenant, deadline)
        await self._load_history(turn)
        messages = merge_history(turn.window, params.messages, request_id)
        worker_req = convert.worker_request_to_pb(
            req, request_id, resolved.model.id, messages, resolved.max_tokens
        )
        ask = Ask(
            prompt_tokens=estimate_tokens(params.prompt or "", *(m.content for m in messages)),
            max_tokens=resolved.max_tokens,
            session_id=params.session_id,
            needs=HardwareNeeds(context_tokens=resolved.max_tokens),
        )
        remaining = deadline.remaining()
        now = self.admission.clock()
        queued = QueuedRequest(
            request_id,
            turn.tenant,
            effective_priority(params.priority),
            ask.prompt_tokens + ask.max_tokens,
            enqueued_at=now,
            deadline=None if remaining is None else now + remaining,
        )
        async with self.admission.slot(queued, remaining):
            async for out in self._relay(worker_req, resolved.model.id, turn, ask):
                yield out

    async def _load_history(self, turn: _Turn) -> None:
        """Fetch the session window; NOT_FOUND fails the request, an unreachable store degrades it."""
        session_id = turn.params.session_id
        if session_id is None:
            return
        if self.sessions is None:
            raise FailedPrecondition(f"session_id: {NO_SESSION_SERVICE}")
        try:
            with span("session read"):
                turn.window = await self.sessions.window(
                    turn.tenant, session_id, self.config.history_token_budget, turn.deadline.remaining()
                )
            turn.record = True
        except SessionUnavailable as exc:
            logger.warning("answering without history: %s", exc.message)
            reason = f"{exc.message}; answered without history and the turn was not recorded"
            turn.degraded.append(Degradation(DegradationStep.HISTORY_UNAVAILABLE, reason))

    async def _relay(
        self, worker_req: Any, model_id: str, turn: _Turn, ask: Ask
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Stream the worker's reply through as it comes; record the turn before the last message."""
        address = ""
        placement: Placement | None = None

        async def open_stream(placed: Placement) -> tuple[Any, Any]:
            nonlocal address, placement
            address, placement = placed.address, placed
            call = self.endpoints.stub(address).Generate(worker_req, timeout=turn.deadline.remaining())
            try:
                return call, await call.read()
            except BaseException:
                call.cancel()
                raise

        call = None
        try:
            call, resp = await self.endpoints.dispatch(
                EndpointKind.WORKER, model_id, open_stream, self.config.dispatch_attempts, ask, hold=True
            )
            reply: list[str] = []
            first = True
            while resp is not grpc.aio.EOF:
                out = convert.generate_response_to_pb(resp, turn.request_id)
                if first:
                    first = False
                    out.model = resp.model or model_id
                    out.worker = address
                    out.session_id = turn.params.session_id or ""
                    out.degraded.extend(convert.degradation_to_pb(d) for d in turn.degraded)
                reply.append(resp.text)
                if convert.is_final(resp):
                    if turn.record and convert.finished_normally(resp):
                        # Recorded before the client sees the end, so its next turn finds this one.
                        note = await self._record(turn, "".join(reply), resp.usage.completion_tokens)
                        if note is not None:
                            out.degraded.append(convert.degradation_to_pb(note))
                    yield out
                    return
                yield out
                resp = await call.read()
            raise Unavailable(f"worker {address} ended the stream without a finish reason")
        except grpc.aio.AioRpcError as exc:
            raise _worker_error(exc, address) from None
        finally:
            if call is not None:
                # Also reached when the client cancels: the worker stops generating at once.
                call.cancel()
                assert placement is not None
                self.endpoints.release(placement)

    async def _record(self, turn: _Turn, reply: str, completion_tokens: int) -> Degradation | None:
        """Append the turn; a failure degrades the answer instead of failing it."""
        assert self.sessions is not None and turn.params.session_id is not None
        turns = turns_to_append(turn.params.messages, reply, turn.request_id, completion_tokens)
        try:
            with span("session append"):
                await self.sessions.append_turns(
                    turn.tenant, turn.params.session_id, turns, turn.deadline.remaining()
                )
        except SessionUnavailable as exc:
            reason = exc.message
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.ALREADY_EXISTS:
                # An earlier attempt of this request recorded the turn (with its own reply).
                logger.info("turn already recorded by an earlier attempt")
                return None
            reason = f"{exc.code().name}: {exc.details()}"
        else:
            return None
        logger.warning("turn not recorded: %s", reason)
        return Degradation(DegradationStep.HISTORY_UNAVAILABLE, f"the turn was not recorded: {reason}")


def estimate_tokens(*texts: str) -> int:
    """Rough token count for placement only: about four characters a token in English."""
    return sum(len(t) for t in texts) // 4


def _worker_error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"worker {address} failed ({exc.code().name}: {exc.details()})")
    # The worker's own verdicts (INVALID_ARGUMENT for a prompt over the context,
    # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...) reach the caller unchanged.
    return exc
