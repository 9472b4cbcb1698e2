"""Periodic liveness probe of a service that runs a model: real work through its real path.

A wedged model thread answers nothing while the gRPC server still accepts calls, so health
must not stay SERVING on the strength of the warm-up at start alone. The worker pushes one
token through its engine, the embedder one embedding through its batcher; the loop around
that is this one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class LivenessProbe:
    """Every `interval_s`: alive if `progress()` moved since the last look (work came out: proof
    enough), else run `probe()` once, which must answer within `timeout_s`.

    `report(serving)` is called when the verdict changes. While `paused()` (draining, stopped)
    nothing is probed and nothing reported: the drain itself says NOT_SERVING.
    """

    def __init__(
        self,
        name: str,
        progress: Callable[[], int],
        probe: Callable[[], Awaitable[bool]],
        report: Callable[[bool], Awaitable[None]],
        *,
        interval_s: float,
        timeout_s: float,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"interval_s={interval_s}, timeout_s={timeout_s}: both must be > 0")
        self.name = name
        self._progress = progress
        self._probe = probe
        self._report = report
        self._paused = paused
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.healthy = True
        self.probes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"{self.name}-health")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def check(self, seen: int) -> bool:
        """One verdict: progress since `seen`, or the probe answered in time."""
        if self._progress() != seen:
            return True
        self.probes += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._probe()
        except TimeoutError:
            if self._progress() != seen:
                return True  # queued behind work that is finishing: alive, just busy
            logger.warning("%s health probe: no answer within %.1fs", self.name, self.timeout_s)
            return False
        except Exception:
            logger.exception("%s health probe failed", self.name)
            return False

    async def _loop(self) -> None:
        seen = self._progress()
        while True:
            await asyncio.sleep(self.interval_s)
            if self._paused():
                continue
            ok = await self.check(seen)
            seen = self._progress()
            if ok != self.healthy and not self._paused():
                self.healthy = ok
                logger.log(
                    logging.INFO if ok else logging.ERROR,
                    "%s health: %s",
                    self.name,
                    "SERVING" if ok else "NOT_SERVING",
                )
                await self._report(ok)
