"""Stopping a background task."""

from __future__ import annotations

import asyncio

from services.common.tasks import cancel_and_wait


async def test_cancel_and_wait_returns_once_the_task_has_unwound() -> None:
    unwound = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.set()

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and unwound.is_set()
    await cancel_and_wait(None)  # no task yet: nothing to do
