"""Sliding-window throughput for load reports."""

from __future__ import annotations

import pytest

from services.embedder.meter import RateMeter


def test_rate_is_events_over_the_window_and_forgets_old_ones() -> None:
    meter = RateMeter(window_s=10.0)
    assert meter.rate(now=0.0) == 0.0
    meter.add(50, now=1.0)
    meter.add(30, now=6.0)
    assert meter.rate(now=6.0) == pytest.approx(8.0)
    assert meter.rate(now=11.5) == pytest.approx(3.0)
    assert meter.rate(now=16.0) == 0.0


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s=0"):
        RateMeter(window_s=0)
