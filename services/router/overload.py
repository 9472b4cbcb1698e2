"""Overload handling at admission, around the degradation ladder (a pure policy).

Asks the load model (`core/load.py`) how long a new request of each class would wait (the
work queued at the workers and ahead of it in this router's queue), asks the ladder what a
request gets, marks BATCH as held while the ladder says so (admission holds it, within the
request's one wait), refuses with a pushback, and keeps the replies
of deterministic requests for the cached-reply rung.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

from services.common.errors import ResourceExhausted
from services.router.core.domain import Degradation, Delta, ModelSpec, Usage, WorkerRequest
from services.router.core.ladder import (
    HoldVerdict,
    Ladder,
    LadderConfig,
    RequestFacts,
    Rung,
    fallback_model,
    refused,
)
from services.router.core.load import ClusterLoad
from services.router.core.queues import Priority
from services.router.core.reply_cache import CachedReply, ReplyCache, reply_key
from services.router.failover import Relayed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one request gets under the current load."""

    model: str
    max_tokens: int
    steps: tuple[Degradation, ...] = ()
    cached: CachedReply | None = None  # answer with this instead of a worker
    cache_key: str | None = None  # where its reply is kept (deterministic requests only)
    held: bool = False  # BATCH held back: admission keeps it until the ladder lets BATCH go


def _key(request: WorkerRequest, model: str, max_tokens: int) -> str:
    return reply_key(replace(request, model=model, max_tokens=max_tokens))


class Overload:
    """One ladder per priority class: a class waits only behind its own and higher classes in
    the priority queue, so its load (and its rung) is its own."""

    def __init__(
        self,
        config: LadderConfig,
        cache: ReplyCache,
        cluster: Callable[[], ClusterLoad],
        ahead: Callable[[Priority], int],
        *,
        max_hold_s: float,
    ) -> None:
        self.ladders = {priority: Ladder(config) for priority in Priority}
        self.config = config
        self.cache = cache
        self.cluster = cluster
        self.ahead = ahead  # tokens queued in this router that a request of a class waits behind
        self.max_hold_s = max_hold_s  # the longest admission holds BATCH back

    async def plan(
        self,
        request: WorkerRequest,
        model: ModelSpec,
        catalog: Sequence[ModelSpec],
        priority: Priority,
        *,
        allow_fallback: bool,
        prompt_tokens: int,
        remaining: Callable[[], float | None],
    ) -> Plan:
        """The ladder's verdict for `request`: RESOURCE_EXHAUSTED with pushback when refused;
        `Plan.held` when BATCH is held back (it then waits in admission, its one wait)."""
        repeatable = request.sampling.deterministic
        max_tokens = request.max_tokens
        capped = min(max_tokens, self.config.capped_max_tokens)
        keys = [_key(request, model.id, max_tokens)] if repeatable else []
        if repeatable and capped != max_tokens and priority >= Priority.STANDARD:
            keys.append(_key(request, model.id, capped))
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
        load = self.cluster()
        ahead = self.ahead(priority)
        wait = load.wait_s(ahead)
        decision = ladder.decide(facts, wait)
        if decision.refuse_retry_after_ms is not None:
            raise refused(priority, wait, decision.refuse_retry_after_ms)
        left = remaining()
        # Refused up front only when it would still be waiting when its caller gives up: its
        # own cost is not known here (max_tokens is a cap, most replies stop well short of it,
        # and a reply cut at the deadline still reaches its caller). The queue, which a request
        # enters once the workers are full, holds it to prompt + max_tokens.
        if not decision.from_cache and priority is not Priority.CRITICAL and load.misses(left, ahead, 0):
            # CRITICAL is tried all the same (it goes first in the queue; the estimate is rough).
            raise ResourceExhausted(
                f"the deadline cannot be met: predicted wait {wait:.1f}s behind the queued work, "
                f"deadline in {left:.1f}s",
                load.retry_after_ms(ahead),
            )
        if decision.from_cache:
            cached = next((hit for k in keys if (hit := self.cache.get(k)) is not None), None)
            if cached is not None:
                return Plan(cached.model, max_tokens, decision.steps, cached=cached)
        chosen = decision.model or model.id
        key = _key(request, chosen, decision.max_tokens) if repeatable else None
        return Plan(chosen, decision.max_tokens, decision.steps, cache_key=key, held=decision.hold)

    def batch_verdict(self) -> HoldVerdict:
        """Whether BATCH is still held back, let go, or now refused, at the current load: what
        admission asks of the requests it holds (the same ladder as `plan`)."""
        wait = self.cluster().wait_s(self.ahead(Priority.BATCH))
        ladder = self.ladders[Priority.BATCH]
        rung = ladder.update(wait)
        retry_after_ms = ladder.retry_after_ms(wait)
        if rung >= Rung.REFUSE:
            return HoldVerdict(wait, hold=False, refuse=True, retry_after_ms=retry_after_ms)
        return HoldVerdict(wait, hold=rung >= Rung.HOLD_BATCH, refuse=False, retry_after_ms=retry_after_ms)

    def remember(self, key: str, reply: CachedReply) -> None:
        self.cache.put(key, reply)


def cached_reply(last: Delta, model: str, texts: Sequence[str], token_ids: Sequence[int]) -> CachedReply:
    """What to keep of a reply that finished normally (`last` is its last piece)."""
    assert last.finish is not None
    usage = last.usage or Usage()
    return CachedReply(
        model=model,
        text="".join(texts),
        token_ids=tuple(token_ids),
        finish=last.finish,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )


async def cached_stream(reply: CachedReply) -> AsyncIterator[Relayed]:
    """A kept reply as a one-piece stream, as if a worker had sent it all at once."""
    usage = Usage(reply.prompt_tokens, reply.completion_tokens)
    yield Relayed(Delta(reply.text, reply.token_ids, (), reply.finish, usage, reply.model), "")
