"""Throughput over a sliding time window, for load reports."""

from __future__ import annotations

import collections


class RateMeter:
    """Events per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s={window_s}: must be > 0")
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def add(self, count: int, now: float) -> None:
        self._events.append((now, count))
        self._total += count
        self._expire(now)

    def rate(self, now: float) -> float:
        self._expire(now)
        return self._total / self.window_s

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            _, count = self._events.popleft()
            self._total -= count
