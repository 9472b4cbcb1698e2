"""Keep CPython's cycle collector off the request path of a long-running service.

A full (generation 2) collection walks every tracked object. A worker holds millions of them
once torch, transformers and the model are loaded, and one such walk stopped its engine for
90-170 ms in the middle of a stream, the whole of an unloaded time to first token. What
startup built lives as long as the process: `freeze_startup_heap` moves it into CPython's
permanent generation (`gc.freeze`), so later collections walk only what serving allocates
(requests, streams), a few thousand objects. vLLM and SGLang freeze after their warm-up for
the same reason.

`GC_PAUSE` records each collection's pause, so a latency outlier can be told from a GC one.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import Gauge, Histogram

logger = logging.getLogger(__name__)

GC_PAUSE = Histogram(
    "infermesh_gc_pause_seconds",
    "Time the process stood still in one CPython cycle collection",
    ["generation"],
    buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
)

FROZEN = Gauge(
    "infermesh_gc_frozen_objects", "Objects of the startup heap the cycle collector no longer walks"
)


def freeze_startup_heap() -> int:
    """Collect what startup left as garbage, then freeze what is left; returns how many
    objects were frozen. Call once the service is loaded and warm, before it serves."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    FROZEN.set(frozen)
    logger.info("startup heap frozen", extra={"objects": frozen})
    return frozen


class PauseRecorder:
    """A `gc.callbacks` hook that times each collection into `GC_PAUSE`."""

    def __init__(self) -> None:
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - self._started)


_recorder = PauseRecorder()


def record_pauses() -> None:
    """Time every collection of this process from now on (idempotent)."""
    if _recorder not in gc.callbacks:
        gc.callbacks.append(_recorder)
