"""What the router knows about each worker and embedder: models, health and latest load.

Pure state: the endpoint monitor feeds it events with a clock reading; placement and
cluster status read it. An endpoint is usable when it is up (reachable, health SERVING),
its latest report is fresh, it is not draining and it is not ejected for repeated errors
(an ejected endpoint is probed back in with one request once its ejection ends).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.router.core.catalog import merge
from services.router.core.domain import EndpointKind, LoadSnapshot, ModelKind, ModelSpec
from services.router.core.load import EndpointLoad, StepModel


@dataclass(eq=False)
class Placed:
    """One request placed on an endpoint: counted there until a report can show it."""

    address: str
    at: float  # clock reading when placed
    tokens: int  # prompt + max tokens
    prompt_tokens: int = 0


@dataclass
class EndpointState:
    address: str
    kind: EndpointKind
    endpoint_id: str = ""
    models: tuple[ModelSpec, ...] = ()
    up: bool = False
    load: LoadSnapshot | None = None
    reported_at: float | None = None  # clock reading when the latest report arrived
    error: str = "not reached yet"
    # Requests placed here that no report has shown yet (the endpoint cannot know them yet).
    placed: list[Placed] = field(default_factory=list)
    # Requests that the latest report still showed but that have ended since (it is up to a
    # report interval old: a burst that follows one that just ended must not avoid this endpoint).
    ended: int = 0
    # Latest non-zero speeds: an idle endpoint reports 0 but has not become slow.
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    # Latest measured decode step model; not measured yet until a report has one.
    step_model: StepModel = field(default_factory=StepModel)
    errors: int = 0  # consecutive failed requests
    ejected_until: float = 0.0
    retired: bool = False  # left service discovery: no new requests, not listed
    # (clock reading, waiting tokens) of the reports within the registry's waiting window.
    waiting: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass(frozen=True)
class EndpointView:
    address: str
    kind: EndpointKind
    usable: bool
    detail: str
    load: LoadSnapshot | None
    report_age_s: float | None
    models: tuple[ModelSpec, ...]


class Registry:
    def __init__(
        self,
        stale_after_s: float,
        eject_after_errors: int = 3,
        eject_s: float = 5.0,
        *,
        waiting_window_s: float = 0.0,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.eject_after_errors = eject_after_errors
        self.eject_s = eject_s
        self._endpoints: dict[str, EndpointState] = {}
        self._configured: tuple[ModelSpec, ...] = ()
        # Queued work counts as such once it lasted this long: a burst being admitted is not a queue.
        self.waiting_window_s = waiting_window_s
        # A request placed this long before a report is in it (on its way and admitted by then).
        # Forgetting a placement at the first report after it instead would undercount an
        # endpoint that a burst just reached, and the next requests would herd onto it.
        self.report_lag_s = 0.05

    def add(self, address: str, kind: EndpointKind) -> None:
        if address in self._endpoints:
            raise ValueError(f"endpoint {address} is already registered")
        self._endpoints[address] = EndpointState(address, kind)

    def retire(self, address: str) -> None:
        """The endpoint left service discovery: no new requests, not listed. Its state stays for
        the requests still running there (and in case the same address comes back)."""
        self._endpoints[address].retired = True

    def restore(self, address: str) -> None:
        """A retired endpoint was discovered again; it is placed on once it reports."""
        state = self._endpoints[address]
        state.retired = False
        state.up = False
        state.error = "rediscovered, not reached yet"

    def on_info(self, address: str, endpoint_id: str, models: tuple[ModelSpec, ...]) -> None:
        state = self._endpoints[address]
        state.endpoint_id = endpoint_id
        state.models = models
        state.up = True
        state.error = ""

    def on_report(self, address: str, load: LoadSnapshot, now: float) -> None:
        state = self._endpoints[address]
        state.load = load
        state.reported_at = now
        state.placed = [p for p in state.placed if p.at > now - self.report_lag_s]
        state.ended = 0
        state.waiting.append((now, load.waiting_tokens))
        while len(state.waiting) > 1 and state.waiting[0][0] < now - self.waiting_window_s:
            state.waiting.popleft()
        if load.decode_tokens_per_s > 0:
            state.decode_tokens_per_s = load.decode_tokens_per_s
        if load.prefill_tokens_per_s > 0:
            state.prefill_tokens_per_s = load.prefill_tokens_per_s
        if load.decode_step_fixed_s > 0 or load.decode_step_per_sequence_s > 0:
            state.step_model = StepModel(
                load.decode_step_fixed_s, load.decode_step_per_sequence_s, load.decode_step_batch
            )
        if load.models:
            state.models = load.models

    def on_down(self, address: str, reason: str) -> bool:
        """Unreachable or not SERVING; True when it was up until now.

        Models stay known so requests for them get UNAVAILABLE, not "unknown model".
        """
        state = self._endpoints[address]
        was_up = state.up
        state.up = False
        state.error = reason
        return was_up

    def on_placed(self, address: str, tokens: int, now: float, prompt_tokens: int = 0) -> Placed:
        """Count a request placed here until a report can show it."""
        placed = Placed(address, now, tokens, prompt_tokens)
        self._endpoints[address].placed.append(placed)
        return placed

    def on_released(self, placed: Placed) -> None:
        """A placed request ended: if no report showed it yet, none will, so stop counting it
        (else sequential requests pile up phantom backlog); if one did, discount it until the
        next report."""
        state = self._endpoints.get(placed.address)
        if state is None:
            return
        if placed in state.placed:
            state.placed.remove(placed)
        else:
            state.ended += 1

    def on_error(self, address: str, now: float) -> bool:
        """A request failed there; True when this ejects it (again, if it was being probed)."""
        state = self._endpoints[address]
        state.errors += 1
        if state.errors < self.eject_after_errors:
            return False
        state.ejected_until = now + self.eject_s
        return True

    def on_success(self, address: str) -> None:
        state = self._endpoints[address]
        state.errors = 0
        state.ejected_until = 0.0

    def _assess(self, state: EndpointState, now: float) -> tuple[bool, str]:
        if state.retired:
            return False, "left service discovery"
        if not state.up:
            return False, f"down: {state.error}"
        if state.load is None or state.reported_at is None:
            return False, "no load report yet"
        age = now - state.reported_at
        if age > self.stale_after_s:
            return False, f"stale: last load report {age:.1f}s ago"
        if state.load.draining:
            return False, "draining"
        if now < state.ejected_until:
            return False, f"ejected after {state.errors} failed requests for {state.ejected_until - now:.1f}s"
        return True, "ok"

    def is_usable(self, address: str, now: float) -> bool:
        return self._assess(self._endpoints[address], now)[0]

    def views(self, now: float) -> list[EndpointView]:
        out = []
        for state in self._endpoints.values():
            if state.retired:
                continue
            usable, detail = self._assess(state, now)
            age = None if state.reported_at is None else max(0.0, now - state.reported_at)
            out.append(EndpointView(state.address, state.kind, usable, detail, state.load, age, state.models))
        return out

    def candidates(
        self, kind: EndpointKind, model_id: str, now: float, exclude: frozenset[str] = frozenset()
    ) -> list[EndpointLoad]:
        """Usable endpoints of `kind` serving `model_id`, in configured order."""
        out = []
        for state in self._endpoints.values():
            if state.kind is not kind or state.address in exclude:
                continue
            model = next((m for m in state.models if m.id == model_id), None)
            if model is None:
                continue
            if self._assess(state, now)[0] and state.load is not None:
                out.append(_endpoint_load(state, state.load, model.context_length))
        return out

    def loads(self, kind: EndpointKind, now: float) -> list[EndpointLoad]:
        """Every usable endpoint of `kind`, whatever it serves: the load model's cluster."""
        return [
            _endpoint_load(state, state.load, 0)
            for state in self._endpoints.values()
            if state.kind is kind and state.load is not None and self._assess(state, now)[0]
        ]

    def describe(self, kind: EndpointKind, now: float) -> str:
        """One line per endpoint of `kind` saying why it is (not) usable, for error messages."""
        parts = [
            f"{state.address} {self._assess(state, now)[1]}"
            for state in self._endpoints.values()
            if state.kind is kind
        ]
        return "; ".join(parts) if parts else f"no {kind.value} configured"

    def configure_models(self, models: Sequence[ModelSpec]) -> None:
        """The operator's model catalog: listed even before (or without) a worker serving them."""
        self._configured = tuple(models)

    def catalog(self, kind: ModelKind | None = None) -> list[ModelSpec]:
        """The configured catalog, then models only endpoints report (first-seen order, the
        smallest context where they differ)."""
        models = merge(self._reported(), self._configured)
        return [m for m in models if kind is None or m.kind is kind]

    def _reported(self) -> list[ModelSpec]:
        merged: dict[str, ModelSpec] = {}
        for state in self._endpoints.values():
            for model in state.models:
                known = merged.get(model.id)
                if known is None:
                    merged[model.id] = model
                elif model.context_length and (
                    not known.context_length or model.context_length < known.context_length
                ):
                    merged[model.id] = model
        return list(merged.values())


def _endpoint_load(state: EndpointState, load: LoadSnapshot, context_length: int) -> EndpointLoad:
    return EndpointLoad(
        address=state.address,
        sequences=max(0, load.waiting + load.running - state.ended) + len(state.placed),
        backlog_tokens=load.running_tokens + load.waiting_tokens + sum(p.tokens for p in state.placed),
        pending_prompt_tokens=sum(p.prompt_tokens for p in state.placed),
        # Each endpoint counts the least it reported within the waiting window, so only a
        # queue that lasts counts (running sequences do not delay a new request in a batching
        # worker; what waits there does).
        waiting_tokens=min((tokens for _, tokens in state.waiting), default=0),
        decode_tokens_per_s=state.decode_tokens_per_s,
        prefill_tokens_per_s=state.prefill_tokens_per_s,
        step=state.step_model,
        device_type=load.device.type,
        memory_total_bytes=load.device.memory_total_bytes,
        context_length=context_length,
    )
