"""Placement: which usable endpoint gets a request.

The default policy keeps the endpoints that can hold the request (hardware, context) and
picks the one with the earliest completion the load model predicts from measured backlog and
measured speed, so a faster device gets proportionally more work with no configured weights.
Sessions stick to the endpoint that served them (its prefix cache) unless it is too slow.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.router.core.load import EndpointLoad, LoadModel


@dataclass(frozen=True)
class HardwareNeeds:
    device_type: str = ""  # "" = any
    min_memory_bytes: int = 0
    context_tokens: int = 0  # prompt + max_tokens the model's context must hold


@dataclass(frozen=True)
class Ask:
    """What placement knows of one request."""

    prompt_tokens: int = 0  # an estimate: the router has no tokenizer
    max_tokens: int = 0
    session_id: str | None = None
    needs: HardwareNeeds = field(default_factory=HardwareNeeds)


class PlacementPolicy(Protocol):
    def choose(self, candidates: Sequence[EndpointLoad], ask: Ask) -> EndpointLoad: ...


def unfit_reason(candidate: EndpointLoad, needs: HardwareNeeds) -> str | None:
    """Why `candidate` cannot hold a request with `needs`; None when it can."""
    if needs.device_type and candidate.device_type != needs.device_type:
        return f"device {candidate.device_type or 'unknown'} is not {needs.device_type}"
    if needs.min_memory_bytes and candidate.memory_total_bytes < needs.min_memory_bytes:
        return f"memory {candidate.memory_total_bytes} bytes < {needs.min_memory_bytes} needed"
    if needs.context_tokens and candidate.context_length and candidate.context_length < needs.context_tokens:
        return f"context {candidate.context_length} tokens < {needs.context_tokens} needed"
    return None


def fitting(candidates: Sequence[EndpointLoad], needs: HardwareNeeds) -> tuple[list[EndpointLoad], list[str]]:
    """The candidates that meet `needs`, and one reason per rejected one (for error messages)."""
    kept: list[EndpointLoad] = []
    reasons: list[str] = []
    for candidate in candidates:
        reason = unfit_reason(candidate, needs)
        if reason is None:
            kept.append(candidate)
        else:
            reasons.append(f"{candidate.address} {reason}")
    return kept, reasons


class PredictedCompletion:
    """Earliest predicted completion wins; a session's previous endpoint unless too slow."""

    def __init__(
        self,
        model: LoadModel | None = None,
        affinity_factor: float = 1.5,
        max_sessions: int = 100_000,
        *,
        session_affinity: bool = True,
    ) -> None:
        if affinity_factor < 1.0:
            raise ValueError(f"affinity_factor={affinity_factor}: must be >= 1")
        self.model = model or LoadModel()
        self.affinity_factor = affinity_factor
        self.session_affinity = session_affinity
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._turn = 0

    def choose(self, candidates: Sequence[EndpointLoad], ask: Ask) -> EndpointLoad:
        if not candidates:
            raise ValueError("no candidates to choose from")
        scored = [(self.model.finish_s(c, ask.prompt_tokens, ask.max_tokens), c) for c in candidates]
        best_s = min(s for s, _ in scored)
        picked = self._affine(scored, ask.session_id, best_s)
        if picked is None:
            # Rotating among equals spreads a burst that lands between two load reports.
            tied = [c for s, c in scored if s <= best_s * (1 + 1e-9)]
            picked = tied[self._turn % len(tied)]
            self._turn += 1
        self._remember(ask.session_id, picked.address)
        return picked

    def _affine(
        self, scored: list[tuple[float, EndpointLoad]], session_id: str | None, best_s: float
    ) -> EndpointLoad | None:
        if session_id is None or not self.session_affinity:
            return None
        previous = self._sessions.get(session_id)
        for seconds, candidate in scored:
            if candidate.address == previous and seconds <= best_s * self.affinity_factor:
                return candidate
        return None

    def _remember(self, session_id: str | None, address: str) -> None:
        if session_id is None or not self.session_affinity:
            return
        self._sessions[session_id] = address
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def session_endpoint(self, session_id: str) -> str | None:
        return self._sessions.get(session_id)


def least_loaded(candidates: Sequence[EndpointLoad], turn: int) -> EndpointLoad:
    """The least loaded candidate; among equals, the `turn`-th (mod their number)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    lowest = min(c.sequences for c in candidates)
    tied = [c for c in candidates if c.sequences == lowest]
    return tied[turn % len(tied)]


class LeastLoaded:
    """The walking skeleton's policy: fewest sequences, ties round-robin; ignores speed."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[EndpointLoad], ask: Ask) -> EndpointLoad:
        picked = least_loaded(candidates, self._turn)
        self._turn += 1
        return picked


POLICIES = ("predicted_time", "least_loaded")


def create_placement_policy(
    name: str = "predicted_time",
    model: LoadModel | None = None,
    affinity_factor: float = 1.5,
    *,
    session_affinity: bool = True,
) -> PlacementPolicy:
    if name == "predicted_time":
        return PredictedCompletion(model, affinity_factor, session_affinity=session_affinity)
    if name == "least_loaded":
        return LeastLoaded()
    raise ValueError(f"unknown placement policy {name!r} (known: {', '.join(POLICIES)})")
