"""Registry under service discovery: a retired endpoint gets no requests and is not listed,
requests still running there can end, and it comes back when rediscovered."""

from __future__ import annotations

from services.router.core.domain import EndpointKind, LoadSnapshot
from tests.unit.router.core.test_registry import CHAT, bring_up, make_registry


def test_retired_endpoint_is_neither_placed_on_nor_listed() -> None:
    registry = make_registry("a", "b")
    bring_up(registry, "a", now=0.0)
    bring_up(registry, "b", now=0.0)
    placed = registry.on_placed("a", 100, now=0.0)
    registry.retire("a")
    assert not registry.is_usable("a", 0.0)
    assert [c.address for c in registry.candidates(EndpointKind.WORKER, CHAT.id, 0.0)] == ["b"]
    assert [v.address for v in registry.views(0.0)] == ["b"]
    # The request placed before it left ends normally.
    registry.on_released(placed)
    registry.on_success("a")


def test_rediscovered_endpoint_serves_again_once_it_reports() -> None:
    registry = make_registry("a")
    bring_up(registry, "a", now=0.0)
    registry.retire("a")
    registry.restore("a")
    assert [v.detail for v in registry.views(1.0)] == ["down: rediscovered, not reached yet"]
    assert not registry.is_usable("a", 1.0)
    registry.on_info("a", "id-a", (CHAT,))
    registry.on_report("a", LoadSnapshot(), 1.0)
    assert registry.is_usable("a", 1.0)
