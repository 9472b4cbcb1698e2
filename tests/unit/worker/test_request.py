"""Request validation: every bad input names its field and the limit."""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.common.errors import InvalidArgument
from services.worker.request import (
    ChatTurn,
    GenerateRequest,
    Limits,
    SamplingParams,
    plan_tokens,
    validate_request,
)

LIMITS = Limits(
    model_id="tiny",
    vocab_size=100,
    context_length=64,
    default_max_tokens=16,
    max_tokens_limit=32,
    max_stop_strings=2,
)
GOOD = GenerateRequest(messages=(ChatTurn("user", "hi"),))


def invalid(req: GenerateRequest) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validate_request(req, LIMITS)
    return info.value


def test_good_requests_pass() -> None:
    validate_request(GOOD, LIMITS)
    validate_request(GenerateRequest(model="tiny", prompt="hi", max_tokens=32), LIMITS)
    validate_request(GenerateRequest(prompt_token_ids=(0, 99), stop=("a", "b")), LIMITS)


def test_unknown_model_names_the_served_one() -> None:
    err = invalid(dataclasses.replace(GOOD, model="gpt-9"))
    assert err.field == "model"
    assert "'gpt-9'" in err.message and "'tiny'" in err.message


@pytest.mark.parametrize(
    ("req", "got"),
    [
        (GenerateRequest(), "got none"),
        (GenerateRequest(messages=(ChatTurn("user", "hi"),), prompt="x"), "got messages and prompt"),
        (GenerateRequest(prompt="x", prompt_token_ids=(1,)), "got prompt and prompt_token_ids"),
    ],
)
def test_exactly_one_prompt_source(req: GenerateRequest, got: str) -> None:
    err = invalid(req)
    assert err.field == "messages/prompt/prompt_token_ids"
    assert got in err.message


def test_empty_prompt_and_empty_messages() -> None:
    assert invalid(GenerateRequest(prompt="")).field == "prompt"
    assert invalid(GenerateRequest(messages=(ChatTurn("user", ""),))).field == "messages"


def test_unset_role_names_the_message() -> None:
    err = invalid(GenerateRequest(messages=(ChatTurn("system", "be brief"), ChatTurn("", "hi"))))
    assert err.field == "messages[1].role"
    assert "ROLE_USER" in err.message


@pytest.mark.parametrize(("max_tokens", "limit"), [(0, ">= 1"), (-3, ">= 1"), (33, "<= 32")])
def test_max_tokens_bounds(max_tokens: int, limit: str) -> None:
    err = invalid(dataclasses.replace(GOOD, max_tokens=max_tokens))
    assert err.field == "max_tokens"
    assert limit in err.message


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", math.nan, ">= 0"),
        ("top_k", -1, ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("min_p", 1.0, "[0, 1)"),
        ("min_p", -0.2, "[0, 1)"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
    ],
)
def test_sampling_bounds(field: str, value: float, rule: str) -> None:
    req = dataclasses.replace(GOOD, sampling=SamplingParams(**{field: value}))
    err = invalid(req)
    assert err.field == f"sampling.{field}"
    assert rule in err.message


@pytest.mark.parametrize("field", ["prompt_token_ids", "stop_token_ids", "resume_token_ids"])
@pytest.mark.parametrize("token", [-1, 100])
def test_token_ids_outside_vocabulary(field: str, token: int) -> None:
    base = GenerateRequest(prompt_token_ids=(1,))
    req = dataclasses.replace(base, **{field: (*getattr(base, field), token)})
    err = invalid(req)
    assert err.field.startswith(f"{field}[")
    assert "[0, 100)" in err.message


def test_stop_strings_count_and_emptiness() -> None:
    assert invalid(dataclasses.replace(GOOD, stop=("a", "b", "c"))).field == "stop"
    assert invalid(dataclasses.replace(GOOD, stop=("a", ""))).field == "stop[1]"


def test_plan_uses_default_and_fits_context() -> None:
    assert plan_tokens(GOOD, prompt_len=10, limits=LIMITS) == 16
    assert plan_tokens(GOOD, prompt_len=60, limits=LIMITS) == 4  # unset: clamped to the context


def test_plan_cuts_set_max_tokens_at_context() -> None:
    req = dataclasses.replace(GOOD, max_tokens=30)
    assert plan_tokens(req, prompt_len=50, limits=LIMITS) == 14


def test_plan_counts_resumed_tokens_toward_max_tokens() -> None:
    req = dataclasses.replace(GOOD, max_tokens=10, resume_token_ids=(1, 2, 3))
    assert plan_tokens(req, prompt_len=5, limits=LIMITS) == 7


def test_plan_rejects_prompt_that_fills_the_context_with_counts() -> None:
    req = dataclasses.replace(GOOD, resume_token_ids=(1, 2, 3, 4))
    with pytest.raises(InvalidArgument) as info:
        plan_tokens(req, prompt_len=60, limits=LIMITS)
    assert info.value.field == "messages"
    assert "60 prompt tokens + 4 resume tokens = 64" in info.value.message
    assert "context length 64" in info.value.message


def test_plan_rejects_resume_reaching_max_tokens() -> None:
    req = dataclasses.replace(GOOD, max_tokens=2, resume_token_ids=(1, 2))
    with pytest.raises(InvalidArgument) as info:
        plan_tokens(req, prompt_len=5, limits=LIMITS)
    assert info.value.field == "resume_token_ids"
    assert "max_tokens=2" in info.value.message


@pytest.mark.parametrize("priority", [-1, 5, 99])
def test_priority_outside_the_enum(priority: int) -> None:
    err = invalid(dataclasses.replace(GOOD, priority=priority))
    assert err.field == "priority" and f"priority={priority}" in err.message
