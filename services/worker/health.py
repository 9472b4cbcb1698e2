"""Periodic liveness probe: a one-token request through the engine's queue and model thread."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.errors import ResourceExhausted, Unavailable
from services.common.liveness import LivenessProbe
from services.worker.engine import Engine
from services.worker.sequence import GenSequence


class HealthProbe(LivenessProbe):
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
        super().__init__(
            "worker",
            lambda: engine.passes,
            self.probe,
            report,
            interval_s=interval_s,
            timeout_s=timeout_s,
            paused=lambda: engine.draining or not engine.alive,
        )

    async def probe(self) -> bool:
        """True once one token came back (the caller bounds the wait)."""
        try:
            handle = self._engine.submit(self._make_seq())
        except ResourceExhausted:
            return False  # a full queue that made no progress in a whole interval is stuck
        except Unavailable:
            return self.healthy  # draining or stopping: nothing to learn
        # Left early (timeout), the stream cancels its request itself.
        async for _ in handle.deltas():
            pass
        return True
