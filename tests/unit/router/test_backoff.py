"""Reconnection backoff doubles up to its cap and resets after a success."""

from __future__ import annotations

from services.router.endpoints import Backoff


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1
