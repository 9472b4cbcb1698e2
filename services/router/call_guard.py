"""Quotas and guardrails, the steps of Generate and Embed that protect the mesh from a call:
input guardrails (size, prompt injection, PII redaction) and the tenant's token quota,
reserved before the request runs and settled from its usage after. The Generate pipeline
calls them in its order (output PII redaction is its own step there, before the turn is
recorded); Embed runs through `embed`. Every verdict is counted; refusals are audited."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.telemetry import span
from services.router import audit
from services.router.core.domain import ChatRole, GenerateCall, GenerateParams
from services.router.core.guardrails import policy
from services.router.core.prompt_tokens import rough_tokens
from services.router.metrics import GUARDRAIL_HITS
from services.router.quota_store import Quotas, Reservation

_CHECKED_ROLES = (ChatRole.USER, ChatRole.TOOL, None)


class CallGuard:
    def __init__(self, guardrails: policy.GuardrailConfig, quotas: Quotas, sink: audit.AuditSink) -> None:
        self.guardrails = guardrails
        self.quotas = quotas
        self.sink = sink

    @property
    def active(self) -> bool:
        # Output redaction is the pipeline's own step: pii_output alone needs no guard.
        g = self.guardrails
        return bool(g.max_input_chars or g.injection or g.pii_input) or self.quotas.enabled

    def _blocked(self, blocked: policy.Blocked, tenant: str, key_prefix: str, method: str) -> InvalidArgument:
        GUARDRAIL_HITS.labels(blocked.guardrail, "blocked").inc()
        self.sink.record(
            audit.GUARDRAIL_BLOCKED, tenant, key_prefix, method, f"{blocked.guardrail}: {blocked.field}"
        )
        return InvalidArgument(blocked.field, blocked.reason)

    def check_input(self, call: GenerateCall) -> GenerateParams:
        """The call's texts through the input guardrails: INVALID_ARGUMENT naming the field
        when one blocks, else the request with what they redacted replaced."""
        params = call.params
        if not self.guardrails.enabled:
            return params
        texts = [m.content for m in params.messages]
        fields = [f"messages[{i}].content" for i in range(len(texts))]
        checked = [m.role in _CHECKED_ROLES for m in params.messages]
        if params.prompt is not None:
            texts.append(params.prompt)
            fields.append("prompt")
            checked.append(True)
        result = policy.check_input(self.guardrails, texts, fields, checked)
        if result.blocked is not None:
            raise self._blocked(result.blocked, call.tenant, call.key_prefix, call.method)
        for kind, count in result.redacted.items():
            GUARDRAIL_HITS.labels(policy.PII_INPUT, f"redacted_{kind}").inc(count)
        if not result.redacted:
            return params
        messages = tuple(replace(m, content=t) for m, t in zip(params.messages, result.texts, strict=False))
        prompt = result.texts[-1] if params.prompt is not None else None
        return replace(params, messages=messages, prompt=prompt)

    async def reserve_generate(self, call: GenerateCall, chars: int, max_tokens: int) -> Reservation | None:
        """The call's tokens (its prompt of `chars` characters, roughly, and all of
        `max_tokens`) reserved from its tenant's quota; None when the tenant has none."""
        tokens = rough_tokens(chars) + max_tokens
        return await self._reserve(call.tenant, call.key_prefix, call.method, tokens)

    async def settle(self, reservation: Reservation | None, used_tokens: int) -> None:
        await self.quotas.settle(reservation, used_tokens)

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


def used_tokens(reservation: Reservation | None, reported: int | None, started: bool) -> int:
    """Tokens to count: the usage reported at the end; none when nothing ran; the whole
    reservation when the stream ended early (cancelled, failed) without a usage."""
    if reported is not None:
        return reported
    if not started or reservation is None:
        return 0
    return reservation.reserved
