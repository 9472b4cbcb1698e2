"""Generation requests as plain values, and their validation against the worker's limits.

Every check raises `InvalidArgument` naming the field and the limit, so a client
can tell what to change without reading the worker's configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from services.common.errors import InvalidArgument
from services.worker.core.seq_state import LOWEST_PRIORITY, STANDARD_PRIORITY

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    # One of ROLES, or "" when the client left the role unset.
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    request_id: str = ""
    model: str = ""
    messages: tuple[ChatTurn, ...] = ()
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] = ()
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    resume_token_ids: tuple[int, ...] = ()
    # The common Priority number (1 critical .. 4 batch); the scheduler runs lower first.
    priority: int = STANDARD_PRIORITY

    @property
    def input_field(self) -> str:
        """The field the prompt came in, for error messages."""
        if self.messages:
            return "messages"
        return "prompt" if self.prompt is not None else "prompt_token_ids"


@dataclasses.dataclass(frozen=True)
class Limits:
    model_id: str
    vocab_size: int
    context_length: int
    default_max_tokens: int
    max_tokens_limit: int
    max_stop_strings: int


def check_model(model: str, limits: Limits) -> None:
    if model and model != limits.model_id:
        raise InvalidArgument("model", f"unknown model {model!r}; this worker serves {limits.model_id!r}")


def check_prompt_source(
    messages: Sequence[ChatTurn], prompt: str | None, token_ids: Sequence[int] = ()
) -> None:
    """Exactly one of messages, prompt, prompt_token_ids; chat turns well formed."""
    given = [
        name
        for name, present in (
            ("messages", bool(messages)),
            ("prompt", prompt is not None),
            ("prompt_token_ids", bool(token_ids)),
        )
        if present
    ]
    if len(given) != 1:
        got = " and ".join(given) if given else "none"
        raise InvalidArgument("messages/prompt/prompt_token_ids", f"set exactly one (got {got})")
    if prompt is not None and not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    for i, turn in enumerate(messages):
        if turn.role not in ROLES:
            raise InvalidArgument(
                f"messages[{i}].role", "must be set to ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
    if messages and not any(turn.content for turn in messages):
        raise InvalidArgument("messages", "every message is empty")


def validate_request(req: GenerateRequest, limits: Limits) -> None:
    """Checks that need no tokenizer. `plan_tokens` does the ones that need token counts."""
    check_model(req.model, limits)
    check_prompt_source(req.messages, req.prompt, req.prompt_token_ids)
    _check_sampling(req.sampling)
    if not 1 <= req.priority <= LOWEST_PRIORITY:
        raise InvalidArgument(
            "priority", f"priority={req.priority}: must be a Priority value, 0 to {LOWEST_PRIORITY}"
        )
    if req.max_tokens is not None:
        if req.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"max_tokens={req.max_tokens}: must be >= 1")
        if req.max_tokens > limits.max_tokens_limit:
            raise InvalidArgument(
                "max_tokens",
                f"max_tokens={req.max_tokens}: must be <= {limits.max_tokens_limit} (this worker's limit)",
            )
    if len(req.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "stop", f"{len(req.stop)} stop strings: at most {limits.max_stop_strings} allowed"
        )
    for i, stop in enumerate(req.stop):
        if not stop:
            raise InvalidArgument(f"stop[{i}]", "must not be empty")
    for field in ("prompt_token_ids", "stop_token_ids", "resume_token_ids"):
        _check_vocab(field, getattr(req, field), limits.vocab_size)


def _check_sampling(s: SamplingParams) -> None:
    def bad(name: str, value: float, rule: str) -> InvalidArgument:
        return InvalidArgument(f"sampling.{name}", f"{name}={value!r}: must be {rule}")

    # NaN fails every comparison, so each rule is written to reject it.
    if not s.temperature >= 0 or math.isinf(s.temperature):
        raise bad("temperature", s.temperature, ">= 0 (0 means greedy)")
    if s.top_k < 0:
        raise bad("top_k", s.top_k, ">= 0 (0 disables top-k)")
    if not 0 < s.top_p <= 1:
        raise bad("top_p", s.top_p, "in (0, 1]")
    if not 0 <= s.min_p < 1:
        raise bad("min_p", s.min_p, "in [0, 1)")
    if not s.repetition_penalty > 0 or math.isinf(s.repetition_penalty):
        raise bad("repetition_penalty", s.repetition_penalty, "> 0 (1 disables the penalty)")


def _check_vocab(field: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise InvalidArgument(
                f"{field}[{i}]", f"token id {token} is outside the vocabulary [0, {vocab_size})"
            )


def plan_tokens(req: GenerateRequest, prompt_len: int, limits: Limits) -> int:
    """How many new tokens this worker may generate, after the resumed ones.

    max_tokens counts resumed tokens too. It is cut to what fits in the context
    whether set or not; a cut one simply ends with FINISH_REASON_LENGTH there.
    """
    resumed = len(req.resume_token_ids)
    if prompt_len + resumed >= limits.context_length:
        raise InvalidArgument(
            req.input_field,
            f"{prompt_len} prompt tokens + {resumed} resume tokens = {prompt_len + resumed}: "
            f"must be < the context length {limits.context_length}",
        )
    max_tokens = req.max_tokens if req.max_tokens is not None else limits.default_max_tokens
    if resumed >= max_tokens:
        which = "max_tokens" if req.max_tokens is not None else "the default max_tokens"
        raise InvalidArgument(
            "resume_token_ids", f"{resumed} resumed tokens already reach {which}={max_tokens}"
        )
    return min(max_tokens, limits.context_length - prompt_len) - resumed
