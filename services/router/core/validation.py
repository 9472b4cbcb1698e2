"""Request checks: every bad input becomes InvalidArgument naming the field and the limit.

Also resolves the model (empty = the default) and the effective max_tokens and time budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.router.core.domain import EmbedParams, GenerateParams, ModelKind, ModelSpec, Sampling

_PRIORITY_MAX = 4  # PRIORITY_BATCH
_KIND_NOUN = {ModelKind.CHAT: "chat", ModelKind.EMBEDDING: "embedding"}
_SERVED_BY = {ModelKind.CHAT: "worker", ModelKind.EMBEDDING: "embedder"}


@dataclass(frozen=True)
class GenerateLimits:
    default_max_tokens: int
    max_tokens_limit: int
    max_stop_sequences: int
    max_request_id_chars: int


@dataclass(frozen=True)
class ResolvedGenerate:
    model: ModelSpec
    max_tokens: int


def resolve_model(requested: str, default: str, catalog: Sequence[ModelSpec], kind: ModelKind) -> ModelSpec:
    """The catalog entry for `requested` (empty: `default`, or the first model of `kind`)."""
    noun = _KIND_NOUN[kind]
    of_kind = [m for m in catalog if m.kind is kind]
    if not of_kind:
        # Nothing to check a name against yet: a later report may well bring the model.
        raise Unavailable(f"no {noun} model is available: no {_SERVED_BY[kind]} has reported its models yet")
    wanted = requested or default or of_kind[0].id
    for model in of_kind:
        if model.id == wanted:
            return model
    known = ", ".join(m.id for m in of_kind)
    if not requested:
        raise Unavailable(
            f"the default {noun} model {default!r} is not served by any {_SERVED_BY[kind]} ({known})"
        )
    if any(m.id == requested for m in catalog):
        raise InvalidArgument("model", f"{requested!r} is not one of the {noun} models ({known})")
    raise InvalidArgument("model", f"unknown model {requested!r} (known {noun} models: {known})")


def validate_generate(
    params: GenerateParams, catalog: Sequence[ModelSpec], default_model: str, limits: GenerateLimits
) -> ResolvedGenerate:
    if len(params.request_id) > limits.max_request_id_chars:
        raise InvalidArgument("request_id", f"must be at most {limits.max_request_id_chars} characters")
    _check_input(params)
    _check_sampling(params.sampling)
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidArgument(
            "stop", f"at most {limits.max_stop_sequences} stop strings are allowed, got {len(params.stop)}"
        )
    for i, stop in enumerate(params.stop):
        if not stop:
            raise InvalidArgument(f"stop[{i}]", "must not be empty")
    if not 0 <= params.priority <= _PRIORITY_MAX:
        raise InvalidArgument("priority", f"unknown priority {params.priority} (valid: 0 to {_PRIORITY_MAX})")
    model = resolve_model(params.model, default_model, catalog, ModelKind.CHAT)
    return ResolvedGenerate(model, _max_tokens(params.max_tokens, model, limits))


def _check_input(params: GenerateParams) -> None:
    if params.prompt is not None and params.messages:
        raise InvalidArgument("prompt", "set exactly one of messages and prompt, not both")
    if params.prompt is None and not params.messages:
        raise InvalidArgument("messages", "must not be empty: set messages (or prompt)")
    if params.prompt is not None and not params.prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if params.session_id is not None:
        if not params.session_id:
            raise InvalidArgument("session_id", "must not be empty when set")
        if params.prompt is not None:
            raise InvalidArgument("session_id", "sessions need chat messages: send messages, not prompt")
    for i, turn in enumerate(params.messages):
        if turn.role is None:
            raise InvalidArgument(
                f"messages[{i}].role", "must be set (ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL)"
            )


def _check_sampling(s: Sampling) -> None:
    if s.temperature is not None and not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be >= 0 (0 is greedy), got {s.temperature}")
    if s.top_k is not None and s.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 disables top-k), got {s.top_k}")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.min_p is not None and not 0 <= s.min_p < 1:
        raise InvalidArgument("sampling.min_p", f"must be in [0, 1), got {s.min_p}")
    if s.repetition_penalty is not None and not (
        math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0
    ):
        raise InvalidArgument(
            "sampling.repetition_penalty", f"must be > 0 (1 disables it), got {s.repetition_penalty}"
        )


def _max_tokens(requested: int | None, model: ModelSpec, limits: GenerateLimits) -> int:
    limit = limits.max_tokens_limit
    why = "the router's limit"
    if model.context_length and model.context_length < limit:
        limit = model.context_length
        why = f"the context length of {model.id}"
    if requested is None:
        return min(limits.default_max_tokens, limit)
    if not 1 <= requested <= limit:
        raise InvalidArgument("max_tokens", f"must be between 1 and {limit} ({why}), got {requested}")
    return requested


def validate_embed(
    params: EmbedParams, catalog: Sequence[ModelSpec], default_model: str, max_inputs: int, max_id_chars: int
) -> ModelSpec:
    if len(params.request_id) > max_id_chars:
        raise InvalidArgument("request_id", f"must be at most {max_id_chars} characters")
    if not params.inputs:
        raise InvalidArgument("inputs", "must not be empty")
    if len(params.inputs) > max_inputs:
        raise InvalidArgument("inputs", f"at most {max_inputs} inputs per request, got {len(params.inputs)}")
    return resolve_model(params.model, default_model, catalog, ModelKind.EMBEDDING)


def time_budget(grpc_remaining: float | None, deadline: float | None, now: float) -> float | None:
    """Seconds left for the request: the earlier of the gRPC deadline and the `deadline` field."""
    budgets = [b for b in (grpc_remaining, None if deadline is None else deadline - now) if b is not None]
    if not budgets:
        return None
    budget = min(budgets)
    if budget <= 0:
        raise DeadlineExceeded("deadline: already passed before the request was dispatched")
    return budget
