"""Periodic liveness check: a real embedding through the batcher and the model thread.

A wedged model thread answers nothing while the gRPC server still accepts calls, so health
must not stay SERVING on the strength of the warm-up at start alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class HealthProbe:
    """Every `interval_s`: healthy if batches finished since the last look, else run `embed` once.

    `report(serving)` is called when the verdict changes. While `paused()` (draining) nothing
    is probed: the drain itself says NOT_SERVING.
    """

    def __init__(
        self,
        embed: Callable[[], Awaitable[object]],
        batches: Callable[[], int],
        report: Callable[[bool], Awaitable[None]],
        *,
        interval_s: float,
        timeout_s: float,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"interval_s={interval_s}, timeout_s={timeout_s}: both must be > 0")
        self._embed = embed
        self._batches = batches
        self._report = report
        self._paused = paused
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.healthy = True
        self.probes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="embedder-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self, seen: int) -> bool:
        """One verdict: batches finished since `seen`, or one embedding answered in time."""
        if self._batches() != seen:
            return True
        self.probes += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._embed()
        except TimeoutError:
            if self._batches() != seen:
                return True  # queued behind batches that are finishing: alive, just busy
            logger.warning("health probe: no embedding within %.1fs", self.timeout_s)
            return False
        except Exception:
            logger.exception("health probe failed")
            return False
        return True

    async def _loop(self) -> None:
        seen = self._batches()
        while True:
            await asyncio.sleep(self.interval_s)
            if self._paused():
                continue
            ok = await self.check(seen)
            seen = self._batches()
            if ok != self.healthy and not self._paused():
                self.healthy = ok
                logger.log(
                    logging.INFO if ok else logging.ERROR,
                    "embedder health: %s",
                    "SERVING" if ok else "NOT_SERVING",
                )
                await self._report(ok)
