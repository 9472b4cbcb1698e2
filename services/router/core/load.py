"""The router's one load model: from what the registry last saw of each worker to every
time the router predicts.

- placement: when a request would finish on each endpoint (`LoadModel.finish_s`);
- admission: how many streams the workers take (`ClusterLoad.slots`, `headroom`);
- the degradation ladder: how long a new request waits (`ClusterLoad.wait_s`);
- deadlines: the one check that a deadline cannot be met (`ClusterLoad.misses`), which the
  ladder step, the queue (at push) and admission (while a request waits) all ask.

A continuous-batching worker runs a decode step in `fixed + per_sequence * batch` seconds as
it measures it, and a request placed there decodes one token a step at the batch it joins.
Work waits only when the workers are full, so queued work drains at the full-batch speed, not
at whatever a lightly loaded worker shows now.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Priors:
    """What is assumed until an endpoint has measured its own."""

    decode_tokens_per_s: float = 50.0
    prefill_tokens_per_s: float = 500.0
    # Reports that give sequence counts but no token counts: tokens assumed per sequence.
    tokens_per_sequence: int = 256
    # A step model whose batch has not varied yet (growth per sequence unknown): one more
    # sequence costs this share of an empty step (about what a CPU shows; a GPU is far lower,
    # and its own measurement replaces this as soon as its batch varies).
    per_sequence_share: float = 0.1


@dataclass(frozen=True)
class StepModel:
    """A worker's decode step against its batch, as it fitted it over recent steps."""

    fixed_s: float = 0.0
    per_sequence_s: float = 0.0
    # Mean batch of the fitted steps: while the growth is unknown (per_sequence 0), fixed_s is
    # the mean step at this batch. 0 = not said (the step is taken as that of an empty batch).
    batch: float = 0.0

    @property
    def measured(self) -> bool:
        return self.fixed_s > 0 or self.per_sequence_s > 0

    def seconds(self, batch: int, share: float) -> float:
        """One step at `batch` sequences; growth not measured yet: `share` of an empty step per
        sequence, grown from the batch it was measured at (a worker measured only at a full
        batch is not charged the growth to that batch twice)."""
        if self.per_sequence_s > 0:
            return self.fixed_s + self.per_sequence_s * batch
        return self.fixed_s * (1 + share * batch) / (1 + share * self.batch)


@dataclass(frozen=True)
class EndpointLoad:
    """One usable endpoint as the registry last saw it, with what was placed there since."""

    address: str
    sequences: int = 0  # waiting + running as reported, less those ended, plus those placed since
    backlog_tokens: int = 0  # reported running + waiting tokens, plus tokens placed since
    pending_prompt_tokens: int = 0  # prompts placed since the report: prefilled before ours, or with it
    waiting_tokens: int = 0  # queued there and not started: the least reported within the window
    decode_tokens_per_s: float = 0.0  # measured; 0 = not measured yet
    prefill_tokens_per_s: float = 0.0
    step: StepModel = field(default_factory=StepModel)
    device_type: str = ""
    memory_total_bytes: int = 0
    context_length: int = 0  # of the requested model here; 0 = unknown (or no model asked)


@dataclass(frozen=True)
class ClusterLoad:
    """The usable workers together, at one moment: what admission and the ladder act on."""

    workers: int = 0
    slots: int = 0  # streams this router runs on them at a time
    # Streams beyond `slots` that CRITICAL and INTERACTIVE may start at once: a batching worker
    # takes one more stream at little cost, and their time to first token stays short.
    headroom: int = 0
    tokens_per_s: float = 0.0  # decode throughput with every slot full
    waiting_tokens: int = 0  # queued at the workers, lasting (not a burst being admitted)
    min_retry_after_ms: int = 100

    def seconds_for(self, tokens: int) -> float:
        """Seconds `tokens` take to drain at the full-batch speed (at best)."""
        if tokens <= 0:
            return 0.0
        return math.inf if self.tokens_per_s <= 0 else tokens / self.tokens_per_s

    def wait_s(self, ahead_tokens: int = 0) -> float:
        """Predicted wait of a new request behind the work queued at the workers and
        `ahead_tokens` queued in this router ahead of it."""
        return self.seconds_for(self.waiting_tokens + ahead_tokens)

    def finish_s(self, ahead_tokens: int, own_tokens: int) -> float:
        """Seconds until a request bringing `own_tokens` (prompt + max tokens) is done, at best."""
        return self.wait_s(ahead_tokens) + self.seconds_for(own_tokens)

    def misses(self, remaining_s: float | None, ahead_tokens: int, own_tokens: int) -> bool:
        """The deadline `remaining_s` away cannot be met even at the full-batch speed. With no
        usable worker there is no estimate (placement answers UNAVAILABLE, or the queue holds
        the request until one is back)."""
        if remaining_s is None or self.workers == 0:
            return False
        return self.finish_s(ahead_tokens, own_tokens) > remaining_s

    def retry_after_ms(self, ahead_tokens: int) -> int:
        """Pushback: come back once what is ahead has drained (at most an hour)."""
        wait = min(self.wait_s(ahead_tokens), 3600.0)
        return max(self.min_retry_after_ms, math.ceil(wait * 1000))


class LoadModel:
    """Turns endpoint loads into predicted times; the only place that does."""

    def __init__(
        self,
        priors: Priors | None = None,
        *,
        streams_per_worker: int = 64,
        headroom_share: float = 1.0,
        min_retry_after_ms: int = 100,
    ) -> None:
        if streams_per_worker < 1:
            raise ValueError(f"streams_per_worker={streams_per_worker}: must be >= 1")
        if headroom_share < 0:
            raise ValueError(f"headroom_share={headroom_share}: must be >= 0")
        self.priors = priors or Priors()
        self.streams_per_worker = streams_per_worker
        self.headroom_share = headroom_share
        self.min_retry_after_ms = min_retry_after_ms

    def step_s(self, step: StepModel, batch: int) -> float:
        return step.seconds(batch, self.priors.per_sequence_share)

    def finish_s(self, endpoint: EndpointLoad, prompt_tokens: int, max_tokens: int) -> float:
        """Time until a request would finish on `endpoint`.

        With a measured step model: the prompts placed there since its report and ours are
        prefilled, then the request joins the running batch and decodes a token a step, each
        step as long as the model says for the batch with it. (An aggregate speed would not do:
        measured at the current batch, it makes a worker given fewer streams look slower.)
        Before one: the endpoint's backlog drains at its aggregate speed, then ours runs.
        """
        priors = self.priors
        prefill = endpoint.prefill_tokens_per_s or priors.prefill_tokens_per_s
        if endpoint.step.measured:
            step_s = self.step_s(endpoint.step, endpoint.sequences + 1)
            return max(1, max_tokens) * step_s + (endpoint.pending_prompt_tokens + prompt_tokens) / prefill
        decode = endpoint.decode_tokens_per_s or priors.decode_tokens_per_s
        backlog = endpoint.backlog_tokens
        if backlog == 0 and endpoint.sequences:
            backlog = endpoint.sequences * priors.tokens_per_sequence
        return (backlog + max(1, max_tokens)) / decode + prompt_tokens / prefill

    def full_tokens_per_s(self, endpoint: EndpointLoad) -> float:
        """Decode tokens/s of `endpoint` running this router's full share of streams: by its
        step model where measured (a queue forms only once the workers are full, and the rate a
        lightly loaded worker shows now is far below that); else its reported speed, else the
        prior."""
        batch = self.streams_per_worker
        if endpoint.step.measured:
            return batch / self.step_s(endpoint.step, batch)
        return endpoint.decode_tokens_per_s or self.priors.decode_tokens_per_s

    def cluster(self, endpoints: Sequence[EndpointLoad]) -> ClusterLoad:
        """The usable workers `endpoints` together."""
        slots = len(endpoints) * self.streams_per_worker
        return ClusterLoad(
            workers=len(endpoints),
            slots=slots,
            headroom=math.ceil(slots * self.headroom_share),
            tokens_per_s=sum(self.full_tokens_per_s(e) for e in endpoints),
            waiting_tokens=sum(e.waiting_tokens for e in endpoints),
            min_retry_after_ms=self.min_retry_after_ms,
        )
