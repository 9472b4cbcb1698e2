"""Overload handling at admission, around the degradation ladder (a pure policy).

Measures the load (tokens waiting at the workers and in this router's queue over their
measured speed), asks the ladder what a request gets, holds BATCH back while the ladder
says so (never past the request's deadline), refuses with a pushback, and keeps the replies
of deterministic requests for the cached-reply rung.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from infermesh.common.v1 import common_pb2
from infermesh.worker.v1 import worker_pb2
from services.common.errors import ResourceExhausted
from services.router.core.domain import Degradation, ModelSpec
from services.router.core.ladder import Ladder, LadderConfig, Load, RequestFacts, fallback_model
from services.router.core.queues import Priority
from services.router.core.reply_cache import CachedReply, ReplyCache
from services.router.failover import Relayed

logger = logging.getLogger(__name__)

_HOLD_POLL_S = 0.1


@dataclass(frozen=True)
class Plan:
    """What one request gets under the current load."""

    model: str
    max_tokens: int
    steps: tuple[Degradation, ...] = ()
    cached: CachedReply | None = None  # answer with this instead of a worker
    cache_key: str | None = None  # where its reply is kept (deterministic requests only)


def deterministic(sampling: common_pb2.SamplingParams) -> bool:
    """Greedy (temperature unset or 0) or seeded: the same request gives the same tokens."""
    if sampling.HasField("seed"):
        return True
    return not sampling.HasField("temperature") or sampling.temperature == 0


def reply_key(req: worker_pb2.GenerateRequest, model: str, max_tokens: int) -> str:
    """Digest of everything that decides the reply (not the request id or priority)."""
    keyed = worker_pb2.GenerateRequest()
    keyed.CopyFrom(req)
    keyed.request_id = ""
    keyed.priority = common_pb2.PRIORITY_UNSPECIFIED
    keyed.model = model
    keyed.max_tokens = max_tokens
    del keyed.resume_token_ids[:]
    return hashlib.sha256(keyed.SerializeToString(deterministic=True)).hexdigest()


class Overload:
    """One ladder per priority class: a class waits only behind its own and higher classes in
    the priority queue, so its load (and its rung) is its own."""

    def __init__(
        self,
        config: LadderConfig,
        cache: ReplyCache,
        load: Callable[[Priority], Load],
        *,
        max_hold_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.ladders = {priority: Ladder(config) for priority in Priority}
        self.config = config
        self.cache = cache
        self.load = load
        self.max_hold_s = max_hold_s
        self.clock = clock

    async def plan(
        self,
        req: worker_pb2.GenerateRequest,
        model: ModelSpec,
        catalog: Sequence[ModelSpec],
        priority: Priority,
        *,
        allow_fallback: bool,
        prompt_tokens: int,
        remaining: Callable[[], float | None],
    ) -> Plan:
        """The ladder's verdict for `req`: RESOURCE_EXHAUSTED with pushback when refused,
        held (asleep) while BATCH is held back."""
        repeatable = deterministic(req.sampling)
        max_tokens = req.max_tokens
        capped = min(max_tokens, self.config.capped_max_tokens)
        keys = [reply_key(req, model.id, max_tokens)] if repeatable else []
        if repeatable and capped != max_tokens and priority >= Priority.STANDARD:
            keys.append(reply_key(req, model.id, capped))
        facts = RequestFacts(
            priority=priority,
            max_tokens=max_tokens,
            allow_fallback=allow_fallback,
            fallback_model=(
                fallback_model(model, catalog, prompt_tokens + max_tokens) if allow_fallback else None
            ),
            deterministic=repeatable,
            cached=any(k in self.cache for k in keys),
        )
        ladder = self.ladders[priority]
        started = self.clock()
        while True:
            load = self.load(priority)
            decision = ladder.decide(facts, load)
            if decision.refuse_retry_after_ms is not None:
                raise ResourceExhausted(
                    f"overloaded: predicted wait {load.wait_s:.1f}s; {priority.name} requests are "
                    "refused until it falls",
                    decision.refuse_retry_after_ms,
                )
            if not decision.hold:
                break
            held = self.clock() - started
            left = remaining()
            budget = self.max_hold_s if left is None else min(self.max_hold_s, held + left - _HOLD_POLL_S)
            if held + _HOLD_POLL_S > budget:
                raise ResourceExhausted(
                    f"overloaded: predicted wait {load.wait_s:.1f}s; BATCH held back for {held:.1f}s "
                    "and its time is up",
                    ladder.retry_after_ms(load.wait_s),
                )
            await asyncio.sleep(_HOLD_POLL_S)
        left = remaining()
        late = left is not None and load.wait_s >= left
        if late and not decision.from_cache and priority is not Priority.CRITICAL:
            # It would still be waiting when its caller gives up: say so now, not at the deadline.
            # CRITICAL is tried all the same (it goes first in the queue; the estimate is rough).
            raise ResourceExhausted(
                f"the deadline cannot be met: predicted wait {load.wait_s:.1f}s behind the queued work, "
                f"deadline in {left:.1f}s",
                max(self.config.min_retry_after_ms, math.ceil(min(load.wait_s, 3600.0) * 1000)),
            )
        if decision.from_cache:
            cached = next((hit for k in keys if (hit := self.cache.get(k)) is not None), None)
            if cached is not None:
                return Plan(cached.model, max_tokens, decision.steps, cached=cached)
        chosen = decision.model or model.id
        key = reply_key(req, chosen, decision.max_tokens) if repeatable else None
        return Plan(chosen, decision.max_tokens, decision.steps, cache_key=key)

    def remember(self, key: str, reply: CachedReply) -> None:
        self.cache.put(key, reply)


def cached_reply(
    final: worker_pb2.GenerateResponse, model: str, texts: Sequence[str], token_ids: Sequence[int]
) -> CachedReply:
    """What to keep of a reply that finished normally (`final` is its last message)."""
    return CachedReply(
        model=model,
        text="".join(texts),
        token_ids=tuple(token_ids),
        finish_reason=final.finish_reason,
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
    )


async def cached_stream(reply: CachedReply) -> AsyncIterator[Relayed]:
    """A kept reply as the one-message stream a worker would have sent."""
    resp = worker_pb2.GenerateResponse(
        text=reply.text,
        token_ids=reply.token_ids,
        finish_reason=common_pb2.FinishReason.ValueType(reply.finish_reason),
        model=reply.model,
    )
    resp.usage.prompt_tokens = reply.prompt_tokens
    resp.usage.completion_tokens = reply.completion_tokens
    yield Relayed(resp, "")
