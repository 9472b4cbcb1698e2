"""Measured speed for load reports: tokens per second of busy time."""

from __future__ import annotations


class SpeedMeter:
    """Tokens per second while working, weighted toward the most recent work.

    Idle time does not count: the router wants to know how fast this worker runs
    when it has work, not how busy it happened to be. Older samples fade with a
    half-life measured in busy seconds.
    """

    def __init__(self, halflife_s: float = 5.0) -> None:
        if halflife_s <= 0:
            raise ValueError(f"halflife_s={halflife_s}: must be > 0")
        self.halflife_s = halflife_s
        self._tokens = 0.0
        self._seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        decay = 0.5 ** (seconds / self.halflife_s)
        self._tokens = self._tokens * decay + tokens
        self._seconds = self._seconds * decay + seconds

    @property
    def rate(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 else 0.0


class StepTimeModel:
    """Seconds of a decode step against its batch size, fitted as `fixed + per_sequence * batch`.

    What the router needs to place a request: on a continuous-batching worker the request
    decodes alongside the running ones, one token a step, so its time is max_tokens steps at
    the batch it joins. An aggregate tokens/s at the current batch cannot say that: a worker
    given fewer streams would look slower and get fewer still. Least squares over recent
    decode steps, older ones fading with a half-life counted in steps.
    """

    def __init__(self, halflife_steps: float = 200.0) -> None:
        if halflife_steps <= 0:
            raise ValueError(f"halflife_steps={halflife_steps}: must be > 0")
        self._decay = 0.5 ** (1 / halflife_steps)
        # Weighted sums: weight, batch, batch², seconds, batch·seconds.
        self._w = self._b = self._bb = self._t = self._bt = 0.0

    def add(self, batch: int, seconds: float) -> None:
        if batch < 1 or seconds <= 0:
            return
        d = self._decay
        self._w = self._w * d + 1
        self._b = self._b * d + batch
        self._bb = self._bb * d + batch * batch
        self._t = self._t * d + seconds
        self._bt = self._bt * d + batch * seconds

    def fit(self) -> tuple[float, float]:
        """(fixed, per_sequence) seconds; (0, 0) before any step. While the batch sizes seen
        barely vary, the growth is unknown: per_sequence 0 and fixed the mean step."""
        if self._w == 0:
            return 0.0, 0.0
        mean_b, mean_t = self._b / self._w, self._t / self._w
        variance = self._bb / self._w - mean_b**2
        if variance < 0.25:
            return mean_t, 0.0
        per_sequence = max(0.0, (self._bt / self._w - mean_b * mean_t) / variance)
        fixed = mean_t - per_sequence * mean_b
        if fixed < 0:  # steeper than a line through the origin: call it all per sequence
            return 0.0, mean_t / mean_b
        return fixed, per_sequence

    @property
    def mean_batch(self) -> float:
        """Mean batch of the fitted steps (recent ones weigh more); 0 before any step."""
        return self._b / self._w if self._w else 0.0
