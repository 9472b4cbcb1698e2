"""Placement: which usable endpoint gets a request.

A policy is anything with `choose(candidates)`. The walking skeleton picks the least
loaded endpoint (waiting + running) and breaks ties round-robin so equal endpoints share
bursts that arrive between two load reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    address: str
    load: int  # sequences waiting + running, as last reported


class PlacementPolicy(Protocol):
    def choose(self, candidates: Sequence[Candidate]) -> Candidate: ...


def least_loaded(candidates: Sequence[Candidate], turn: int) -> Candidate:
    """The least loaded candidate; among equals, the `turn`-th (mod their number)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    lowest = min(c.load for c in candidates)
    tied = [c for c in candidates if c.load == lowest]
    return tied[turn % len(tied)]


class LeastLoaded:
    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        picked = least_loaded(candidates, self._turn)
        self._turn += 1
        return picked


def create_placement_policy(name: str = "least_loaded") -> PlacementPolicy:
    if name == "least_loaded":
        return LeastLoaded()
    raise ValueError(f"unknown placement policy {name!r} (known: least_loaded)")
