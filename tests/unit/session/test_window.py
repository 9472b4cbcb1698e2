"""select_window: newest messages within the token budget, first system message always kept."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from services.session.model import Role
from services.session.window import estimate_tokens, select_window


@dataclass(frozen=True)
class M:
    seq: int
    role: Role
    token_count: int


def make_history(*specs: tuple[Role, int]) -> list[M]:
    return [M(i + 1, role, tokens) for i, (role, tokens) in enumerate(specs)]


S, U, A = Role.SYSTEM, Role.USER, Role.ASSISTANT


def seqs(window: tuple[list[M], bool]) -> tuple[list[int], bool]:
    return [m.seq for m in window[0]], window[1]


def test_budget_zero_returns_everything():
    history = make_history((S, 50), (U, 50), (A, 50))
    assert seqs(select_window(history, 0)) == ([1, 2, 3], False)


def test_empty_history():
    assert select_window([], 10) == ([], False)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (39, ([1, 2, 3, 4, 5], False)),  # an exact fit counts
        (38, ([1, 3, 4, 5], True)),
        (24, ([1, 4, 5], True)),
        (14, ([1, 5], True)),
        (13, ([1], True)),
        (1, ([1], True)),  # the system prompt stays even over budget
    ],
)
def test_system_prompt_kept_and_newest_messages_fill_the_rest(budget, expected):
    history = make_history((S, 4), (U, 5), (A, 10), (U, 10), (A, 10))
    assert seqs(select_window(history, budget)) == expected


def test_no_holes_a_message_that_does_not_fit_ends_the_window():
    history = make_history((U, 1), (A, 100), (U, 1))
    # The oldest message would fit on its own, but skipping the big one would leave a hole.
    assert seqs(select_window(history, 10)) == ([3], True)


def test_without_system_message():
    history = make_history((U, 3), (A, 3), (U, 3))
    assert seqs(select_window(history, 6)) == ([2, 3], True)
    assert seqs(select_window(history, 2)) == ([], True)


def test_only_the_first_system_message_is_pinned():
    history = make_history((S, 2), (U, 5), (S, 5), (U, 5))
    assert seqs(select_window(history, 12)) == ([1, 3, 4], True)


def test_system_message_in_the_middle_keeps_seq_order():
    history = make_history((U, 5), (A, 5), (S, 1), (U, 5))
    assert seqs(select_window(history, 6)) == ([3, 4], True)
    assert seqs(select_window(history, 11)) == ([2, 3, 4], True)
    assert seqs(select_window(history, 16)) == ([1, 2, 3, 4], False)


def test_zero_token_messages_always_fit_next_to_the_budget():
    history = make_history((U, 0), (A, 5), (U, 0))
    assert seqs(select_window(history, 5)) == ([1, 2, 3], False)


def reference(history: list[M], budget: int) -> list[int]:
    """Longest suffix (ignoring the pinned system message) whose total fits, by brute force."""
    if budget <= 0:
        return [m.seq for m in history]
    pinned = next((m for m in history if m.role == S), None)
    rest = [m for m in history if m is not pinned]
    left = budget - (pinned.token_count if pinned else 0)
    best: list[M] = []
    for start in range(len(rest), -1, -1):
        if sum(m.token_count for m in rest[start:]) <= left:
            best = rest[start:]
        else:
            break
    return sorted(m.seq for m in [*best, *([pinned] if pinned else [])])


def test_matches_a_brute_force_reference():
    rng = random.Random(7)
    for _ in range(500):
        roles = [rng.choice([S, U, U, A, A, Role.TOOL]) for _ in range(rng.randint(0, 12))]
        history = make_history(*((role, rng.randint(0, 20)) for role in roles))
        budget = rng.randint(0, 120)
        window, truncated = select_window(history, budget)
        assert [m.seq for m in window] == reference(history, budget)
        assert truncated == (len(window) < len(history))


def test_estimate_tokens():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abc") == 1
    assert estimate_tokens("x" * 400) == 100
