"""The router's prompt token estimate learns what the chat template adds, per model."""

from __future__ import annotations

import pytest

from services.router.core.prompt_tokens import PromptTokens, rough_tokens


def test_starts_rough_and_learns_the_template_overhead_per_model() -> None:
    tokens = PromptTokens(weight=0.5)
    assert tokens.estimate("chat", 40) == rough_tokens(40) == 11
    # The worker counted the system prompt and role markers too: 30 tokens more, every time.
    for chars in (40, 400, 120, 80):
        tokens.observe("chat", chars, rough_tokens(chars) + 30)
    assert tokens.estimate("chat", 200) == rough_tokens(200) + 30
    assert tokens.estimate("other", 200) == rough_tokens(200)


def test_one_odd_count_moves_the_estimate_by_its_weight() -> None:
    tokens = PromptTokens(weight=0.1)
    tokens.observe("chat", 40, 41)  # first count: taken as it is (offset 30)
    tokens.observe("chat", 40, 11 + 130)  # then one 100 tokens off
    assert tokens.estimate("chat", 40) == 11 + 40


def test_no_count_teaches_nothing_and_the_weight_is_checked() -> None:
    tokens = PromptTokens()
    tokens.observe("chat", 40, 0)
    assert tokens.estimate("chat", 40) == rough_tokens(40)
    with pytest.raises(ValueError, match="weight=0"):
        PromptTokens(weight=0)
