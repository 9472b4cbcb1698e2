"""The startup heap freeze and the collection pause histogram (services.common.heap)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common import heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_freezing_collects_startup_garbage_and_hides_the_rest_from_collections(unfrozen: None) -> None:
    kept = _Node()
    garbage = weakref.ref(_Node())
    assert garbage() is not None
    frozen = heap.freeze_startup_heap()
    assert garbage() is None  # startup's garbage is not frozen for good
    assert frozen == gc.get_freeze_count() > 0
    assert heap.FROZEN._value.get() == frozen
    # What is kept sits in the permanent generation, which no collection walks.
    assert not any(obj is kept for generation in range(3) for obj in gc.get_objects(generation))
    gc.unfreeze()
    assert any(obj is kept for obj in gc.get_objects(2))


def test_each_collection_pause_is_observed_by_generation() -> None:
    def observed(generation: str) -> tuple[float, float]:
        child = heap.GC_PAUSE.labels(generation)
        return child._sum.get(), sum(b.get() for b in child._buckets)

    heap.record_pauses()
    heap.record_pauses()  # idempotent: one hook
    assert gc.callbacks.count(heap._recorder) == 1
    seconds, count = observed("2")
    gc.collect()
    assert observed("2")[1] == count + 1
    assert observed("2")[0] > seconds
