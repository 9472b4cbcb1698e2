"""Periodic liveness probe: a one-token request through the engine's queue and model thread.

A wedged engine task or model thread answers nothing, so health must not stay SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from services.common.errors import ResourceExhausted, Unavailable
from services.worker.engine import Engine
from services.worker.sequence import GenSequence

logger = logging.getLogger(__name__)


class HealthProbe:
    """Every `interval_s`, unless the engine made progress since the last look, push one token through it.

    `report(True/False)` is called when the verdict changes; a draining or dead engine is never
    reported healthy again (drain and crash report NOT_SERVING themselves).
    """

    def __init__(
        self,
        engine: Engine,
        make_seq: Callable[[], GenSequence],
        report: Callable[[bool], Awaitable[None]],
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._engine = engine
        self._make_seq = make_seq
        self._report = report
        self._interval = interval_s
        self._timeout = timeout_s
        self.healthy = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="worker-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        seen = self._engine.passes
        while True:
            await asyncio.sleep(self._interval)
            if self._engine.draining or not self._engine.alive:
                continue
            if self._engine.passes != seen:
                # Tokens came out during the interval: that is proof of liveness already.
                ok = True
            else:
                ok = await self.probe()
            seen = self._engine.passes
            await self._set(ok)

    async def probe(self) -> bool:
        """True when one token came back within the timeout, or other requests ahead of it made progress."""
        before = self._engine.passes
        try:
            handle = self._engine.submit(self._make_seq())
        except ResourceExhausted:
            return False  # a full queue that made no progress in a whole interval is stuck
        except Unavailable:
            return self.healthy  # draining or stopping: nothing to learn
        try:
            async with asyncio.timeout(self._timeout):
                async for _ in handle.deltas():
                    pass
        except TimeoutError:
            handle.cancel()
            if self._engine.passes != before:
                return True  # queued behind requests that are producing tokens: alive
            logger.warning("health probe got no token within %.1fs", self._timeout)
            return False
        except Exception:
            logger.exception("health probe failed")
            return False
        return True

    async def _set(self, ok: bool) -> None:
        if ok == self.healthy:
            return
        if ok and (self._engine.draining or not self._engine.alive):
            return
        self.healthy = ok
        logger.log(
            logging.INFO if ok else logging.ERROR, "worker health: %s", "SERVING" if ok else "NOT_SERVING"
        )
        await self._report(ok)
