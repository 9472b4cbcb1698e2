"""The Generate flow: validate, prepend session history, place on a worker, relay the
stream as it comes, and record the turn when the stream finishes normally (or, marked
incomplete, with what was delivered when the caller cancels)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

import grpc

from infermesh.router.v1 import router_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.logs import request_id_var
from services.common.telemetry import span
from services.router import convert
from services.router.admission import Admission, Capacity
from services.router.auth import authorize_model
from services.router.config import RouterConfig
from services.router.core.catalog import AUTO, TIERS, auto_quality, pick_auto
from services.router.core.domain import (
    ChatTurn,
    Degradation,
    DegradationStep,
    EndpointKind,
    GenerateParams,
    HistoryMessage,
    ModelKind,
)
from services.router.core.guardrails import policy
from services.router.core.history import merge_history, turns_to_append
from services.router.core.ladder import LadderConfig, Load
from services.router.core.placement import Ask, HardwareNeeds
from services.router.core.prompt_tokens import PromptTokens, rough_tokens
from services.router.core.queues import (
    Priority,
    QueueConfig,
    QueuedRequest,
    create_request_queue,
    effective_priority,
)
from services.router.core.reply_cache import ReplyCache
from services.router.core.validation import GenerateLimits, time_budget, validate_generate
from services.router.endpoints import EndpointMonitor
from services.router.failover import Failover, Relayed
from services.router.metrics import FAILOVERS, GUARDRAIL_HITS
from services.router.overload import Overload, cached_reply, cached_stream
from services.router.sessions import SessionClient, SessionUnavailable

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
    prompt_chars: int = 0  # of the prompt as sent to the worker (history included)


class Generation:
    def __init__(
        self,
        config: RouterConfig,
        endpoints: EndpointMonitor,
        sessions: SessionClient | None,
        guardrails: policy.GuardrailConfig,
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.sessions = sessions
        # Output PII redaction runs here, inside the layer that records the turn: the session
        # keeps the reply the client saw.
        self.guardrails = guardrails
        self._background: set[asyncio.Task[Degradation | None]] = set()
        # Prompt tokens as the workers count them (chat template included), learnt per model.
        self.prompt_tokens = PromptTokens()
        self.limits = GenerateLimits(
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            max_stop_sequences=config.max_stop_sequences,
            max_request_id_chars=config.max_request_id_chars,
        )
        queue = create_request_queue(config.queue_policy, QueueConfig(aging_s=config.queue_aging_s))
        self.admission = Admission(queue, self._capacity, endpoints.clock)
        self.failover = Failover(
            endpoints,
            stall_timeout_s=config.stall_timeout_s,
            attempts=config.failover_attempts,
            on_failover=lambda reason: FAILOVERS.labels("worker", reason).inc(),
        )
        endpoints.registry.waiting_window_s = config.overload_window_s
        self.overload = Overload(
            LadderConfig(
                thresholds_s=tuple(config.degradation_thresholds_s),  # type: ignore[arg-type]
                capped_max_tokens=config.degraded_max_tokens,
            ),
            ReplyCache(config.reply_cache_entries),
            self._load,
            max_hold_s=config.batch_hold_max_s,
            clock=endpoints.clock,
        )

    def _capacity(self) -> Capacity:
        registry = self.endpoints.registry
        workers, tokens_per_s = registry.throughput(
            EndpointKind.WORKER,
            self.endpoints.clock(),
            self.config.prior_decode_tokens_per_s,
            self.config.max_streams_per_worker,
        )
        slots = workers * self.config.max_streams_per_worker
        return Capacity(slots, tokens_per_s, math.ceil(slots * self.config.priority_headroom))

    def _load(self, priority: Priority) -> Load:
        """Tokens a new request of `priority` waits behind (queued at the workers, and in this
        router's queue at its class or above) and how fast they go."""
        registry, now = self.endpoints.registry, self.endpoints.clock()
        _, tokens_per_s = registry.throughput(
            EndpointKind.WORKER,
            now,
            self.config.prior_decode_tokens_per_s,
            self.config.max_streams_per_worker,
        )
        queued = self.admission.queue.queued_tokens(priority)
        return Load(registry.waiting_tokens(EndpointKind.WORKER, now) + queued, tokens_per_s)

    async def stream(
        self, req: router_pb2.GenerateRequest, tenant: str, time_remaining: float | None
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Generate for `tenant` within `time_remaining` seconds (None: no gRPC deadline; the
        request's own `deadline` field still applies)."""
        params = convert.generate_from_pb(req)
        request_id = params.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        params = self._resolve_auto(params)
        resolved = validate_generate(
            params, self.endpoints.registry.catalog(), self.config.default_chat_model, self.limits
        )
        authorize_model(resolved.model.id)
        deadline = _Deadline(time_budget(time_remaining, params.deadline, time.time()))
        turn = _Turn(params, request_id, tenant, deadline)
        await self._load_history(turn)
        messages = merge_history(turn.window, params.messages, request_id)
        worker_req = convert.worker_request_to_pb(
            req, request_id, resolved.model.id, messages, resolved.max_tokens
        )
        turn.prompt_chars = prompt_chars(params.prompt, messages)
        ask = Ask(
            prompt_tokens=self.prompt_tokens.estimate(resolved.model.id, turn.prompt_chars),
            max_tokens=resolved.max_tokens,
            session_id=params.session_id,
            needs=HardwareNeeds(
                device_type=resolved.model.device_type,
                min_memory_bytes=resolved.model.min_memory_bytes,
                context_tokens=resolved.max_tokens,
            ),
        )
        plan = await self.overload.plan(
            worker_req,
            resolved.model,
            self.endpoints.registry.catalog(),
            effective_priority(params.priority),
            allow_fallback=req.allow_fallback,
            prompt_tokens=ask.prompt_tokens,
            remaining=deadline.remaining,
        )
        turn.degraded.extend(plan.steps)
        if plan.cached is not None:
            async for out in self._relay(cached_stream(plan.cached), plan.model, turn):
                yield out
            return
        worker_req.model, worker_req.max_tokens = plan.model, plan.max_tokens
        ask = replace(ask, max_tokens=plan.max_tokens)
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
            relayed = self.failover.stream(worker_req, plan.model, ask, deadline.remaining)
            async for out in self._relay(relayed, plan.model, turn, plan.cache_key):
                yield out

    def _resolve_auto(self, params: GenerateParams) -> GenerateParams:
        """`auto` (or `auto:<tier>`) becomes the served chat model its prompt and tier call for."""
        quality = auto_quality(params.model)
        if quality is None:
            return params
        if quality not in ("", *TIERS):
            choices = ", ".join(f"{AUTO}:{t}" for t in TIERS)
            raise InvalidArgument("model", f"{params.model!r}: {AUTO} takes no tier or one of {choices}")
        registry, now = self.endpoints.registry, self.endpoints.clock()
        served = [
            m for m in registry.catalog(ModelKind.CHAT) if registry.candidates(EndpointKind.WORKER, m.id, now)
        ]
        prompt_tokens = rough_tokens(prompt_chars(params.prompt, params.messages))
        max_tokens = params.max_tokens or self.config.default_max_tokens
        picked = pick_auto(quality, prompt_tokens, max_tokens, served, self.config.auto_long_prompt_tokens)
        if picked is None:
            known = ", ".join(f"{m.id} ({m.tier or 'no tier'})" for m in served) or "none"
            raise Unavailable(
                f"model {params.model!r}: no served chat model with a tier holds "
                f"{prompt_tokens + max_tokens} tokens (served: {known})"
            )
        return replace(params, model=picked.id)

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
        self, stream: AsyncIterator[Relayed], model_id: str, turn: _Turn, cache_key: str | None = None
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Pass the reply through as it comes (from workers, moving to another one when one
        breaks, or from the reply cache), redacted where output PII redaction is on; record the
        turn as the client sees it, before the last message."""
        reply: list[str] = []  # as generated: what the reply cache keeps
        shown: list[str] = []  # as sent to the client: what the session records
        token_ids: list[int] = []
        redactor = policy.OutputRedactor(self.guardrails.pii_kinds) if self.guardrails.pii_output else None
        first = True
        recording = False  # the finished turn is being (or was) recorded
        try:
            async for relayed in stream:
                resp = relayed.resp
                out = convert.generate_response_to_pb(resp, turn.request_id)
                final = convert.is_final(resp)
                if redactor is not None:
                    out.text = redactor.feed(resp.text) + (redactor.finish() if final else "")
                    # Token ids would carry the redacted text past the redaction.
                    del out.token_ids[:]
                    del out.logprobs[:]
                    if final:
                        for kind, count in redactor.redacted.items():
                            GUARDRAIL_HITS.labels(policy.PII_OUTPUT, f"redacted_{kind}").inc(count)
                if first:
                    first = False
                    out.model = resp.model or model_id
                    out.session_id = turn.params.session_id or ""
                    out.degraded.extend(convert.degradation_to_pb(d) for d in turn.degraded)
                if relayed.moved is not None or not reply:
                    out.worker = relayed.address
                if relayed.moved is not None:
                    out.degraded.append(convert.degradation_to_pb(relayed.moved))
                reply.append(resp.text)
                shown.append(out.text)
                token_ids.extend(resp.token_ids)
                if final and resp.usage.prompt_tokens:
                    self.prompt_tokens.observe(model_id, turn.prompt_chars, resp.usage.prompt_tokens)
                if final and convert.finished_normally(resp):
                    if cache_key is not None:
                        self.overload.remember(
                            cache_key, cached_reply(resp, out.model or model_id, reply, token_ids)
                        )
                    if turn.record:
                        recording = True
                        # Recorded before the client sees the end, so its next turn finds this one.
                        note = await self._record(turn, "".join(shown), resp.usage.completion_tokens)
                        if note is not None:
                            out.degraded.append(convert.degradation_to_pb(note))
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (cancelled, or its deadline passed): keep what it was sent.
            delivered = "".join(shown)
            if turn.record and not recording and delivered:
                self._record_in_background(turn, delivered, len(token_ids))
            raise

    def _record_in_background(self, turn: _Turn, reply: str, delivered_tokens: int) -> None:
        """Append the turn with the reply as delivered so far, marked incomplete. The call it
        belongs to is gone, so this runs on its own, bounded by downstream_timeout_s."""
        task = asyncio.create_task(self._record(turn, reply, delivered_tokens, complete=False))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record(
        self, turn: _Turn, reply: str, completion_tokens: int, *, complete: bool = True
    ) -> Degradation | None:
        """Append the turn; a failure degrades the answer instead of failing it."""
        assert self.sessions is not None and turn.params.session_id is not None
        turns = turns_to_append(
            turn.params.messages, reply, turn.request_id, completion_tokens, complete=complete
        )
        # A reply cut short by its caller is recorded after the caller's deadline may have passed.
        remaining = turn.deadline.remaining() if complete else None
        try:
            with span("session append"):
                await self.sessions.append_turns(turn.tenant, turn.params.session_id, turns, remaining)
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


def prompt_chars(prompt: str | None, messages: Sequence[HistoryMessage | ChatTurn]) -> int:
    return len(prompt or "") + sum(len(m.content) for m in messages)
