"""Speed meter: busy-time tokens per second, recent work weighted most."""

from __future__ import annotations

import pytest

from services.worker.meter import SpeedMeter


def test_empty_meter_reads_zero() -> None:
    assert SpeedMeter().rate == 0.0


def test_steady_work_reads_its_speed() -> None:
    m = SpeedMeter()
    for _ in range(50):
        m.add(1, 0.02)
    assert m.rate == pytest.approx(50.0)


def test_recent_speed_dominates() -> None:
    m = SpeedMeter(halflife_s=1.0)
    for _ in range(100):
        m.add(1, 0.1)  # 10 tok/s for 10 s
    for _ in range(100):
        m.add(1, 0.02)  # then 50 tok/s for 2 s
    # Two half-lives later the old 10 tok/s weighs a quarter: the reading sits near 40.
    assert 35 < m.rate < 50


def test_rejects_bad_halflife() -> None:
    with pytest.raises(ValueError, match="halflife_s=0"):
        SpeedMeter(halflife_s=0)
