"""Placement: which usable endpoint gets a request.

The default policy keeps the endpoints that can hold the request (hardware, context) and
picks the one with the earliest predicted completion from measured backlog and measured
speed, so a faster device gets proportionally more work with no configured weights.
Sessions stick to the endpoint that served them (its prefix cache) unless it is too slow.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    """A usable endpoint serving the requested model, as the registry last saw it."""

    address: str
    load: int = 0  # sequences waiting + running as last reported, less those ended, plus those placed since
    backlog_tokens: int = 0  # reported running + waiting tokens, plus tokens placed since
    pending_prompt_tokens: int = 0  # prompts placed since the report: prefilled before ours, or with it
    decode_tokens_per_s: float = 0.0  # measured; 0 = not measured yet
    prefill_tokens_per_s: float = 0.0
    # Measured decode step seconds = fixed + per_sequence * batch; both 0 = not measured yet.
    decode_step_fixed_s: float = 0.0
    decode_step_per_sequence_s: float = 0.0
    device_type: str = ""
    memory_total_bytes: int = 0
    context_length: int = 0  # of the requested model on this endpoint; 0 = unknown


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


@dataclass(frozen=True)
class Priors:
    """Speeds assumed until an endpoint has measured its own."""

    decode_tokens_per_s: float = 50.0
    prefill_tokens_per_s: float = 500.0
    # Reports that give sequence counts but no token counts: tokens assumed per sequence.
    tokens_per_sequence: int = 256
    # A step model whose batch has not varied yet (per-sequence cost unknown): the cost of one
    # more sequence, as a share of the fixed cost (about what a CPU shows; a GPU is far lower,
    # and its own measurement replaces this as soon as its batch varies).
    per_sequence_share: float = 0.1


class PlacementPolicy(Protocol):
    def choose(self, candidates: Sequence[Candidate], ask: Ask) -> Candidate: ...


def unfit_reason(candidate: Candidate, needs: HardwareNeeds) -> str | None:
    """Why `candidate` cannot hold a request with `needs`; None when it can."""
    if needs.device_type and candidate.device_type != needs.device_type:
        return f"device {candidate.device_type or 'unknown'} is not {needs.device_type}"
    if needs.min_memory_bytes and candidate.memory_total_bytes < needs.min_memory_bytes:
        return f"memory {candidate.memory_total_bytes} bytes < {needs.min_memory_bytes} needed"
    if needs.context_tokens and candidate.context_length and candidate.context_length < needs.context_tokens:
        return f"context {candidate.context_length} tokens < {needs.context_tokens} needed"
    return None


def fitting(candidates: Sequence[Candidate], needs: HardwareNeeds) -> tuple[list[Candidate], list[str]]:
    """The candidates that meet `needs`, and one reason per rejected one (for error messages)."""
    kept: list[Candidate] = []
    reasons: list[str] = []
    for candidate in candidates:
        reason = unfit_reason(candidate, needs)
        if reason is None:
            kept.append(candidate)
        else:
            reasons.append(f"{candidate.address} {reason}")
    return kept, reasons


def step_seconds(fixed: float, per_sequence: float, batch: int, priors: Priors) -> float:
    """A decode step at `batch` sequences by a measured step model (per_sequence 0: not
    measured yet, the prior share of the fixed cost stands in)."""
    return fixed + (per_sequence or fixed * priors.per_sequence_share) * batch


def predicted_seconds(candidate: Candidate, ask: Ask, priors: Priors) -> float:
    """Time until `ask` would finish on `candidate`.

    With a measured step model: the prompts placed there since its report and ours are
    prefilled, then the request joins the running batch and decodes a token a step, each step
    as long as the model says for the batch with it. (An aggregate speed would not do: measured
    at the current batch, it makes a worker given fewer streams look slower.) Before one: the
    endpoint's backlog drains at its aggregate speed, then ours runs.
    """
    prefill = candidate.prefill_tokens_per_s or priors.prefill_tokens_per_s
    fixed, per_sequence = candidate.decode_step_fixed_s, candidate.decode_step_per_sequence_s
    if fixed > 0 or per_sequence > 0:
        step_s = step_seconds(fixed, per_sequence, candidate.load + 1, priors)
        return (
            max(1, ask.max_tokens) * step_s + (candidate.pending_prompt_tokens + ask.prompt_tokens) / prefill
        )
    decode = candidate.decode_tokens_per_s or priors.decode_tokens_per_s
    backlog = candidate.backlog_tokens
    if backlog == 0 and candidate.load:
        backlog = candidate.load * priors.tokens_per_sequence
    return (backlog + max(1, ask.max_tokens)) / decode + ask.prompt_tokens / prefill


class PredictedCompletion:
    """Earliest predicted completion wins; a session's previous endpoint unless too slow."""

    def __init__(
        self,
        priors: Priors | None = None,
        affinity_factor: float = 1.5,
        max_sessions: int = 100_000,
        *,
        session_affinity: bool = True,
    ) -> None:
        if affinity_factor < 1.0:
            raise ValueError(f"affinity_factor={affinity_factor}: must be >= 1")
        self.priors = priors or Priors()
        self.affinity_factor = affinity_factor
        self.session_affinity = session_affinity
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate], ask: Ask) -> Candidate:
        if not candidates:
            raise ValueError("no candidates to choose from")
        scored = [(predicted_seconds(c, ask, self.priors), c) for c in candidates]
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
        self, scored: list[tuple[float, Candidate]], session_id: str | None, best_s: float
    ) -> Candidate | None:
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


def least_loaded(candidates: Sequence[Candidate], turn: int) -> Candidate:
    """The least loaded candidate; among equals, the `turn`-th (mod their number)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    lowest = min(c.load for c in candidates)
    tied = [c for c in candidates if c.load == lowest]
    return tied[turn % len(tied)]


class LeastLoaded:
    """The walking skeleton's policy: fewest sequences, ties round-robin; ignores speed."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate], ask: Ask) -> Candidate:
        picked = least_loaded(candidates, self._turn)
        self._turn += 1
        return picked


POLICIES = ("predicted_time", "least_loaded")


def create_placement_policy(
    name: str = "predicted_time",
    priors: Priors | None = None,
    affinity_factor: float = 1.5,
    *,
    session_affinity: bool = True,
) -> PlacementPolicy:
    if name == "predicted_time":
        return PredictedCompletion(priors, affinity_factor, session_affinity=session_affinity)
    if name == "least_loaded":
        return LeastLoaded()
    raise ValueError(f"unknown placement policy {name!r} (known: {', '.join(POLICIES)})")
