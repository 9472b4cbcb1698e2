"""Quotas and guardrails around Generate and Embed, run after authentication and before the
servicer: input guardrails (size, prompt injection, PII redaction), the tenant's token quota
reserved before the request runs and settled from its usage after (output PII redaction runs
in `generation`, before the turn is recorded). Every verdict is counted; refusals are audited."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from infermesh.common.v1 import common_pb2
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.telemetry import span
from services.router import audit
from services.router.core.guardrails import policy
from services.router.core.prompt_tokens import rough_tokens
from services.router.metrics import GUARDRAIL_HITS
from services.router.quota_store import Quotas, Reservation

_CHECKED_ROLES = (common_pb2.ROLE_USER, common_pb2.ROLE_TOOL, common_pb2.ROLE_UNSPECIFIED)


class CallGuard:
    def __init__(
        self,
        guardrails: policy.GuardrailConfig,
        quotas: Quotas,
        sink: audit.AuditSink,
        *,
        default_max_tokens: int,
        max_tokens_limit: int,
    ) -> None:
        self.guardrails = guardrails
        self.quotas = quotas
        self.sink = sink
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit

    @property
    def active(self) -> bool:
        # Output redaction is not this layer's (see `generation`): pii_output alone needs no guard.
        g = self.guardrails
        return bool(g.max_input_chars or g.injection or g.pii_input) or self.quotas.enabled

    def _blocked(self, blocked: policy.Blocked, tenant: str, key_prefix: str, method: str) -> InvalidArgument:
        GUARDRAIL_HITS.labels(blocked.guardrail, "blocked").inc()
        self.sink.record(
            audit.GUARDRAIL_BLOCKED, tenant, key_prefix, method, f"{blocked.guardrail}: {blocked.field}"
        )
        return InvalidArgument(blocked.field, blocked.reason)

    def _check_generate_input(self, request: Any, tenant: str, key_prefix: str, method: str) -> int:
        """Guard the request's texts in place; returns their length in characters."""
        texts = [m.content for m in request.messages]
        fields = [f"messages[{i}].content" for i in range(len(texts))]
        checked = [m.role in _CHECKED_ROLES for m in request.messages]
        if request.HasField("prompt"):
            texts.append(request.prompt)
            fields.append("prompt")
            checked.append(True)
        if self.guardrails.enabled:
            result = policy.check_input(self.guardrails, texts, fields, checked)
            if result.blocked is not None:
                raise self._blocked(result.blocked, tenant, key_prefix, method)
            for kind, count in result.redacted.items():
                GUARDRAIL_HITS.labels(policy.PII_INPUT, f"redacted_{kind}").inc(count)
            if result.redacted:
                for i, message in enumerate(request.messages):
                    message.content = result.texts[i]
                if request.HasField("prompt"):
                    request.prompt = result.texts[-1]
            texts = result.texts
        return sum(len(t) for t in texts)

    def _max_tokens(self, request: Any) -> int:
        wanted = request.max_tokens if request.HasField("max_tokens") else self.default_max_tokens
        return max(1, min(int(wanted), self.max_tokens_limit))

    async def generate(
        self, request: Any, tenant: str, key_prefix: str, method: str, run: Callable[[], AsyncIterator[Any]]
    ) -> AsyncIterator[Any]:
        chars = self._check_generate_input(request, tenant, key_prefix, method)
        reservation = await self._reserve(
            tenant, key_prefix, method, rough_tokens(chars) + self._max_tokens(request)
        )
        used: int | None = None
        sent_any = False
        try:
            async for response in run():
                sent_any = True
                if response.HasField("usage"):
                    used = response.usage.prompt_tokens + response.usage.completion_tokens
                yield response
        finally:
            # Not run at all: nothing to count. Ended early: the reservation stands.
            await self.quotas.settle(reservation, _used(reservation, used, sent_any))

    async def embed(
        self, request: Any, tenant: str, key_prefix: str, method: str, run: Callable[[], Any]
    ) -> Any:
        chars = sum(len(t) for t in request.inputs)
        if self.guardrails.max_input_chars and chars > self.guardrails.max_input_chars:
            reason = f"input of {chars} characters is over max_input_chars={self.guardrails.max_input_chars}"
            raise self._blocked(
                policy.Blocked(policy.INPUT_SIZE, "inputs", reason), tenant, key_prefix, method
            )
        reservation = await self._reserve(tenant, key_prefix, method, rough_tokens(chars))
        used = 0
        try:
            response = await run()
            used = response.usage.prompt_tokens if response is not None else 0
            return response
        finally:
            await self.quotas.settle(reservation, used)

    async def _reserve(self, tenant: str, key_prefix: str, method: str, tokens: int) -> Reservation | None:
        try:
            with span("quota", tokens=tokens):
                return await self.quotas.reserve(tenant, tokens)
        except ResourceExhausted as exc:
            self.sink.record(audit.QUOTA_REFUSED, tenant, key_prefix, method, exc.message[:200])
            raise


def _used(reservation: Reservation | None, reported: int | None, sent_any: bool) -> int:
    """Tokens to count: the usage reported at the end; none when nothing ran; the whole
    reservation when the stream ended early (cancelled, failed) without a usage."""
    if reported is not None:
        return reported
    if not sent_any or reservation is None:
        return 0
    return reservation.reserved
