"""Generate, top to bottom. `Pipeline.generate` takes each call through these steps, in
this order; each is one call below, and this is the only place that orders them.

 1. validate      fields and limits (INVALID_ARGUMENT naming the field); the model resolved
                  (`auto` included) and authorized for the caller; the time budget set
 2. guard input   size, prompt injection, input PII redaction (`call_guard`)
 3. reserve       the tenant's token quota: the prompt, roughly, and all of max_tokens
 4. history       the session window merged in front (store unreachable: answered without it)
 5. plan          the degradation ladder's verdict under the current load: as asked, capped,
                  a fallback model, a kept reply, held back (BATCH) or refused (`overload`)
 6. admit         a slot in this router's priority queue (`admission`), the request's one
                  wait: a held BATCH request waits there until the ladder lets BATCH go
 7. relay         from a worker, moved token-exact to another one on a break or stall
                  (`failover`), or from the reply cache
 8. guard output  PII redaction of what the client is sent
 9. record        the turn appended to the session as the client saw it, before the last
                  message goes out (cancelled: what was delivered, marked incomplete)
10. settle        the quota charged with the reported usage (cut short: all it reserved)

Every message the client gets, and how the call ended, is observed for the metrics. The
pipeline works on plain values (`core.domain`); protobuf stays in the servicer, `convert`
and the worker edge of `failover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace

import grpc

from services.common.errors import DomainError, FailedPrecondition, InvalidArgument, Unavailable
from services.common.logs import request_id_var
from services.common.telemetry import span
from services.router.admission import Admission
from services.router.auth import authorize_model
from services.router.call_guard import CallGuard, used_tokens
from services.router.config import RouterConfig
from services.router.core.catalog import AUTO, TIERS, auto_quality, pick_auto
from services.router.core.domain import (
    ChatTurn,
    Degradation,
    DegradationStep,
    EndpointKind,
    GenerateCall,
    GenerateParams,
    HistoryMessage,
    ModelKind,
    ReplyChunk,
    Usage,
    WorkerRequest,
)
from services.router.core.guardrails import policy
from services.router.core.history import merge_history, turns_to_append
from services.router.core.ladder import LadderConfig
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
from services.router.metrics import FAILOVERS, GUARDRAIL_HITS, GenerateObservation
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

    params: GenerateParams  # as guarded
    request_id: str
    tenant: str
    deadline: _Deadline
    window: list[HistoryMessage] = field(default_factory=list)
    degraded: list[Degradation] = field(default_factory=list)
    record: bool = False  # the window was read, so the turn is appended at the end
    prompt_chars: int = 0  # of the prompt as sent to the worker (history included)


class Pipeline:
    def __init__(
        self,
        config: RouterConfig,
        endpoints: EndpointMonitor,
        sessions: SessionClient | None,
        guard: CallGuard,
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.sessions = sessions
        self.guard = guard
        self.guardrails = guard.guardrails
        self._background: set[asyncio.Task[Degradation | None]] = set()
        # Prompt tokens as the workers count them (chat template included), learnt per model.
        self.prompt_tokens = PromptTokens()
        self.limits = GenerateLimits(
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            max_stop_sequences=config.max_stop_sequences,
            max_request_id_chars=config.max_request_id_chars,
        )
        queue = create_request_queue(
            config.queue.policy, QueueConfig(aging_s=config.queue.aging_s), endpoints.cluster
        )
        self.overload = Overload(
            LadderConfig(
                thresholds_s=tuple(config.degradation_thresholds_s),  # type: ignore[arg-type]
                capped_max_tokens=config.degraded_max_tokens,
            ),
            ReplyCache(config.reply_cache_entries),
            endpoints.cluster,
            queue.queued_tokens,
            max_hold_s=config.batch.hold_max_s,
        )
        # BATCH held back by the ladder waits in admission: one wait, one deadline.
        self.admission = Admission(queue, endpoints.clock, hold=self.overload)
        self.failover = Failover(
            endpoints,
            stall_timeout_s=config.stall_timeout_s,
            attempts=config.failover_attempts,
            on_failover=lambda reason: FAILOVERS.labels("worker", reason).inc(),
        )

    async def generate(self, call: GenerateCall) -> AsyncIterator[ReplyChunk]:
        """The reply to `call`, message by message, as observed for the metrics."""
        observed = GenerateObservation(call.tenant, call.params.model, call.params.priority)
        try:
            async for chunk in self._steps(call):
                observed.sent(chunk)
                yield chunk
        except DomainError as exc:
            observed.failed(exc.status)
            raise
        except grpc.aio.AioRpcError as exc:
            observed.failed(exc.code().name)
            raise
        finally:
            observed.close()

    async def _steps(self, call: GenerateCall) -> AsyncIterator[ReplyChunk]:
        # 1. validate
        params = self._resolve_auto(call.params)
        request_id = params.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        catalog = self.endpoints.registry.catalog()
        resolved = validate_generate(params, catalog, self.config.default_chat_model, self.limits)
        authorize_model(resolved.model.id)
        deadline = _Deadline(time_budget(call.time_remaining, params.deadline, time.time()))
        # 2. guard input
        params = self.guard.check_input(replace(call, params=params))
        turn = _Turn(params, request_id, call.tenant, deadline)
        # 3. reserve
        chars = prompt_chars(params.prompt, params.messages)
        reservation = await self.guard.reserve_generate(call, chars, resolved.max_tokens)
        usage: Usage | None = None
        started = False
        try:
            # 4. history
            await self._load_history(turn)
            messages = merge_history(turn.window, params.messages, request_id)
            turn.prompt_chars = prompt_chars(params.prompt, messages)
            request = WorkerRequest(
                request_id=request_id,
                model=resolved.model.id,
                max_tokens=resolved.max_tokens,
                messages=() if params.prompt is not None else tuple(messages),
                prompt=params.prompt,
                sampling=params.sampling,
                stop=params.stop,
                stop_token_ids=params.stop_token_ids,
                priority=params.priority,
            )
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
            # 5. plan
            priority = effective_priority(params.priority)
            plan = await self.overload.plan(
                request,
                resolved.model,
                catalog,
                priority,
                allow_fallback=params.allow_fallback,
                prompt_tokens=ask.prompt_tokens,
                remaining=deadline.remaining,
            )
            turn.degraded.extend(plan.steps)
            slot: AbstractAsyncContextManager[None] = contextlib.nullcontext()
            if plan.cached is not None:
                source = cached_stream(plan.cached)
            else:
                request = replace(request, model=plan.model, max_tokens=plan.max_tokens)
                ask = replace(ask, max_tokens=plan.max_tokens)
                # 6. admit
                slot = self.admission.slot(
                    self._queued(turn, priority, ask), deadline.remaining(), held=plan.held
                )
                # 7. relay (read only once admitted)
                source = self.failover.stream(request, ask, deadline.remaining)
            async with slot:
                # 7-9. relay, guard output, record
                async for chunk in self._relay(source, plan.model, turn, plan.cache_key):
                    started = True
                    if chunk.finish is not None:
                        usage = chunk.usage
                    yield chunk
        finally:
            # 10. settle
            reported = None if usage is None else usage.prompt_tokens + usage.completion_tokens
            await self.guard.settle(reservation, used_tokens(reservation, reported, started))

    def _queued(self, turn: _Turn, priority: Priority, ask: Ask) -> QueuedRequest:
        remaining = turn.deadline.remaining()
        now = self.admission.clock()
        return QueuedRequest(
            turn.request_id,
            turn.tenant,
            priority,
            ask.prompt_tokens + ask.max_tokens,
            enqueued_at=now,
            deadline=None if remaining is None else now + remaining,
        )

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
    ) -> AsyncIterator[ReplyChunk]:
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
                delta = relayed.delta
                final = delta.finish is not None
                text, ids, logprobs = delta.text, delta.token_ids, delta.logprobs
                # 8. guard output
                if redactor is not None:
                    text = redactor.feed(delta.text) + (redactor.finish() if final else "")
                    # Token ids would carry the redacted text past the redaction.
                    ids, logprobs = (), ()
                    if final:
                        for kind, count in redactor.redacted.items():
                            GUARDRAIL_HITS.labels(policy.PII_OUTPUT, f"redacted_{kind}").inc(count)
                model = session_id = worker = ""
                degraded: list[Degradation] = []
                if first:
                    first = False
                    model = delta.model or model_id
                    session_id = turn.params.session_id or ""
                    degraded.extend(turn.degraded)
                if relayed.moved is not None or not reply:
                    worker = relayed.address
                if relayed.moved is not None:
                    degraded.append(relayed.moved)
                reply.append(delta.text)
                shown.append(text)
                token_ids.extend(delta.token_ids)
                if final and delta.usage is not None and delta.usage.prompt_tokens:
                    self.prompt_tokens.observe(model_id, turn.prompt_chars, delta.usage.prompt_tokens)
                if delta.finish is not None and delta.finish.normal:
                    if cache_key is not None:
                        self.overload.remember(
                            cache_key, cached_reply(delta, model or model_id, reply, token_ids)
                        )
                    # 9. record
                    if turn.record:
                        recording = True
                        # Recorded before the client sees the end, so its next turn finds this one.
                        note = await self._record(turn, "".join(shown), _completion_tokens(delta.usage))
                        if note is not None:
                            degraded.append(note)
                yield ReplyChunk(
                    request_id=turn.request_id,
                    text=text,
                    token_ids=ids,
                    logprobs=logprobs,
                    finish=delta.finish,
                    usage=delta.usage,
                    model=model,
                    session_id=session_id,
                    worker=worker,
                    degraded=tuple(degraded),
                )
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


def _completion_tokens(usage: Usage | None) -> int:
    return 0 if usage is None else usage.completion_tokens


def prompt_chars(prompt: str | None, messages: Sequence[HistoryMessage | ChatTurn]) -> int:
    return len(prompt or "") + sum(len(m.content) for m in messages)
