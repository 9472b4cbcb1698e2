"""The servicer's deadline guard: a store call that outlives a near deadline is given up in time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.common.errors import Unavailable
from services.session.servicer import within_deadline


class Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


async def slow(seconds: float, cancelled: list[bool]) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        cancelled.append(True)
        raise
    return "done"


async def test_a_call_past_a_near_deadline_is_unavailable_before_it_and_cancelled():
    cancelled: list[bool] = []
    start = time.monotonic()
    with pytest.raises(Unavailable, match="deadline"):
        await within_deadline(Context(0.2), slow(5, cancelled), guard_below_s=10)
    assert time.monotonic() - start < 0.2
    await asyncio.sleep(0)
    assert cancelled == [True]


@pytest.mark.parametrize("remaining", [None, 20.0])
async def test_far_or_no_deadline_awaits_the_call_itself(remaining: Any):
    assert await within_deadline(Context(remaining), slow(0.01, []), guard_below_s=10) == "done"


async def test_a_call_in_time_returns_its_result_or_error():
    assert await within_deadline(Context(5.0), slow(0.01, []), guard_below_s=10) == "done"

    async def failing() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await within_deadline(Context(5.0), failing(), guard_below_s=10)
