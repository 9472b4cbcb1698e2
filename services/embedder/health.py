"""Periodic liveness check: a real embedding through the batcher and the model thread."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.liveness import LivenessProbe


class HealthProbe(LivenessProbe):
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
        async def probe() -> bool:
            await embed()
            return True

        super().__init__(
            "embedder", batches, probe, report, interval_s=interval_s, timeout_s=timeout_s, paused=paused
        )
