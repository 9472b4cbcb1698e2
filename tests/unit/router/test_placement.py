"""Placement: least loaded wins, ties go round-robin."""

from __future__ import annotations

import pytest

from services.router.placement import Candidate, LeastLoaded, create_placement_policy, least_loaded


def test_least_loaded_wins_regardless_of_turn() -> None:
    candidates = [Candidate("a", 3), Candidate("b", 1), Candidate("c", 2)]
    assert {least_loaded(candidates, turn).address for turn in range(5)} == {"b"}


def test_ties_are_broken_by_turn() -> None:
    candidates = [Candidate("a", 1), Candidate("b", 0), Candidate("c", 0)]
    assert [least_loaded(candidates, turn).address for turn in range(4)] == ["b", "c", "b", "c"]


def test_policy_rotates_among_equals() -> None:
    policy = LeastLoaded()
    candidates = [Candidate("a", 0), Candidate("b", 0), Candidate("c", 0)]
    assert [policy.choose(candidates).address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_no_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        least_loaded([], 0)


def test_factory_knows_its_policies() -> None:
    assert isinstance(create_placement_policy("least_loaded"), LeastLoaded)
    with pytest.raises(ValueError, match="unknown placement policy 'random'"):
        create_placement_policy("random")
