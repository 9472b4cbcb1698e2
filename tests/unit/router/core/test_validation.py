"""Request validation: each bad field is named with its limit; models and limits resolve."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.router.core.domain import (
    ChatRole,
    ChatTurn,
    EmbedParams,
    GenerateParams,
    ModelKind,
    ModelSpec,
    Sampling,
)
from services.router.core.validation import (
    GenerateLimits,
    resolve_model,
    time_budget,
    validate_embed,
    validate_generate,
)

CHAT = ModelSpec("chat", ModelKind.CHAT, context_length=1024)
CHAT2 = ModelSpec("chat2", ModelKind.CHAT)  # context unknown
EMBED = ModelSpec("embed", ModelKind.EMBEDDING)
CATALOG = [CHAT, CHAT2, EMBED]
LIMITS = GenerateLimits(
    default_max_tokens=256, max_tokens_limit=4096, max_stop_sequences=4, max_request_id_chars=16
)


def make_params(**fields: Any) -> GenerateParams:
    fields.setdefault("messages", (ChatTurn(ChatRole.USER, "hi"),))
    return GenerateParams(**fields)


def invalid(params: GenerateParams, catalog: list[ModelSpec] = CATALOG) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        validate_generate(params, catalog, "", LIMITS)
    return err.value


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"messages": ()}, "messages", "must not be empty"),
        ({"prompt": "x"}, "prompt", "set exactly one of messages and prompt"),
        ({"messages": (), "prompt": ""}, "prompt", "must not be empty"),
        (
            {"messages": (ChatTurn(ChatRole.USER, "a"), ChatTurn(None, "b"))},
            "messages[1].role",
            "must be set",
        ),
        ({"session_id": ""}, "session_id", "must not be empty"),
        ({"messages": (), "prompt": "p", "session_id": "s"}, "session_id", "sessions need chat messages"),
        ({"model": "nope"}, "model", "unknown model 'nope' (known chat models: chat, chat2)"),
        ({"model": "embed"}, "model", "'embed' is not one of the chat models (chat, chat2)"),
        ({"max_tokens": 0}, "max_tokens", "must be between 1 and 1024 (the context length of chat), got 0"),
        ({"max_tokens": 1025}, "max_tokens", "between 1 and 1024 (the context length of chat)"),
        ({"model": "chat2", "max_tokens": 4097}, "max_tokens", "between 1 and 4096 (the router's limit)"),
        ({"sampling": Sampling(temperature=-0.1)}, "sampling.temperature", "must be >= 0"),
        ({"sampling": Sampling(temperature=math.inf)}, "sampling.temperature", "must be >= 0"),
        ({"sampling": Sampling(top_k=-2)}, "sampling.top_k", "must be >= 0"),
        ({"sampling": Sampling(top_p=0.0)}, "sampling.top_p", "must be in (0, 1]"),
        ({"sampling": Sampling(top_p=1.01)}, "sampling.top_p", "must be in (0, 1]"),
        ({"sampling": Sampling(min_p=-0.1)}, "sampling.min_p", "must be in [0, 1)"),
        ({"sampling": Sampling(min_p=1.0)}, "sampling.min_p", "must be in [0, 1)"),
        ({"sampling": Sampling(repetition_penalty=0.0)}, "sampling.repetition_penalty", "must be > 0"),
        ({"sampling": Sampling(repetition_penalty=math.nan)}, "sampling.repetition_penalty", "must be > 0"),
        ({"stop": ("a",) * 5}, "stop", "at most 4 stop strings are allowed, got 5"),
        ({"stop": ("a", "")}, "stop[1]", "must not be empty"),
        ({"priority": 5}, "priority", "unknown priority 5 (valid: 0 to 4)"),
        ({"request_id": "x" * 17}, "request_id", "must be at most 16 characters"),
    ],
)
def test_bad_generate_names_the_field(fields: dict[str, Any], field: str, message: str) -> None:
    err = invalid(make_params(**fields))
    assert err.field == field
    assert message in err.message
    assert err.message.startswith(f"{field}: ")


def test_good_request_resolves_default_model_and_max_tokens() -> None:
    resolved = validate_generate(make_params(), CATALOG, "", LIMITS)
    assert resolved.model == CHAT and resolved.max_tokens == 256
    resolved = validate_generate(make_params(model="chat2", max_tokens=4096), CATALOG, "", LIMITS)
    assert resolved.model == CHAT2 and resolved.max_tokens == 4096


def test_edge_values_are_accepted() -> None:
    sampling = Sampling(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    params = make_params(sampling=sampling, max_tokens=1, stop=("a",) * 4, priority=4, request_id="x" * 16)
    assert validate_generate(params, CATALOG, "", LIMITS).max_tokens == 1
    assert validate_generate(make_params(messages=(), prompt="p"), CATALOG, "", LIMITS).model == CHAT


def test_default_max_tokens_is_capped_by_a_small_context() -> None:
    tiny = ModelSpec("tiny", ModelKind.CHAT, context_length=100)
    assert validate_generate(make_params(), [tiny], "", LIMITS).max_tokens == 100


def test_configured_default_model_wins_over_catalog_order() -> None:
    assert resolve_model("", "chat2", CATALOG, ModelKind.CHAT) == CHAT2
    assert resolve_model("", "", CATALOG, ModelKind.EMBEDDING) == EMBED
    with pytest.raises(Unavailable, match="the default chat model 'gone' is not served by any worker"):
        resolve_model("", "gone", CATALOG, ModelKind.CHAT)


def test_empty_catalog_is_unavailable_not_invalid() -> None:
    for requested in ("", "chat"):
        with pytest.raises(Unavailable, match="no worker has reported its models yet"):
            resolve_model(requested, "", [EMBED], ModelKind.CHAT)


def test_embed_checks_inputs_and_model() -> None:
    assert validate_embed(EmbedParams(inputs=("a",)), CATALOG, "", 2, 16) == EMBED
    cases = [
        (EmbedParams(), "inputs: must not be empty"),
        (EmbedParams(inputs=("a", "b", "c")), "inputs: at most 2 inputs per request, got 3"),
        (
            EmbedParams(inputs=("a",), model="chat"),
            "model: 'chat' is not one of the embedding models (embed)",
        ),
        (EmbedParams(inputs=("a",), request_id="r" * 17), "request_id: must be at most 16 characters"),
    ]
    for params, message in cases:
        with pytest.raises(InvalidArgument) as err:
            validate_embed(params, CATALOG, "", 2, 16)
        assert err.value.message == message


def test_time_budget_takes_the_earlier_deadline() -> None:
    assert time_budget(None, None, 100.0) is None
    assert time_budget(5.0, None, 100.0) == 5.0
    assert time_budget(None, 102.0, 100.0) == 2.0
    assert time_budget(5.0, 102.0, 100.0) == 2.0
    assert time_budget(1.0, 102.0, 100.0) == 1.0
    with pytest.raises(DeadlineExceeded, match="deadline: already passed"):
        time_budget(None, 99.0, 100.0)
    with pytest.raises(DeadlineExceeded):
        time_budget(0.0, None, 100.0)
