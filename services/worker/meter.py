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
