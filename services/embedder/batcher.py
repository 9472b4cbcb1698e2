"""The asyncio actor that owns a `BatchQueue` and runs each batch on a worker thread.

Concurrent `submit` calls are merged into shared encode calls; the event loop
stays free while the encoder runs, and each caller gets exactly its own vectors.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

from services.common.errors import Unavailable
from services.common.tasks import cancel_and_wait
from services.embedder.batching import Batch, BatchQueue, Job
from services.embedder.meter import RateMeter
from services.embedder.metrics import BATCH_SIZE, BATCH_TOKENS

logger = logging.getLogger(__name__)

V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class BatcherLoad:
    waiting: int
    waiting_tokens: int
    running: int
    running_tokens: int
    items_per_s: float
    batches: int
    # Encode calls per batch size (inputs per call), since start.
    batch_sizes: dict[int, int]


class Batcher(Generic[V]):
    """Merges concurrent requests into encode calls bounded by a token budget and a max wait."""

    def __init__(
        self,
        encode: Callable[[list[str]], Sequence[V]],
        *,
        max_batch_tokens: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 10.0,
    ) -> None:
        self._encode = encode
        self._queue: BatchQueue[V] = BatchQueue(max_batch_tokens, max_wait_s)
        self._clock = clock
        self._meter = RateMeter(rate_window_s)
        # One thread: the encoder is not re-entrant and batches are meant to run one at a time.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._futures: dict[Job[V], asyncio.Future[list[V]]] = {}
        self._wakeup = asyncio.Event()
        # Set while nothing is queued or running, for drain().
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: Batch[V] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._batches = 0
        self._sizes: collections.Counter[int] = collections.Counter()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="embed-batcher")

    async def submit(self, texts: Sequence[str], tokens: Sequence[int]) -> list[V]:
        """Encode `texts` (with their token costs) and return one vector per text, in order."""
        if self._closed or self._task is None:
            raise Unavailable("the embedder is not running (starting or shutting down); retry elsewhere")
        job: Job[V] = Job(texts, tokens, arrived=self._clock())
        future: asyncio.Future[list[V]] = asyncio.get_running_loop().create_future()
        self._futures[job] = future
        self._queue.add(job)
        self._idle.clear()
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._queue.cancel(job)
            self._wakeup.set()
            raise
        finally:
            self._futures.pop(job, None)

    @property
    def batches(self) -> int:
        return self._batches

    def load(self) -> BatcherLoad:
        running = self._running
        return BatcherLoad(
            waiting=self._queue.waiting,
            waiting_tokens=self._queue.waiting_tokens,
            running=len(running) if running else 0,
            running_tokens=running.cost if running else 0,
            items_per_s=self._meter.rate(self._clock()),
            batches=self._batches,
            batch_sizes=dict(self._sizes),
        )

    async def drain(self) -> None:
        """Return once nothing is queued or running."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop taking work; callers still waiting get UNAVAILABLE."""
        self._closed = True
        # Keys as strings: the JSON log line keeps its shape whatever the formatter does with ints.
        logger.info(
            "batcher closed",
            extra={
                "batches": self._batches,
                "batch_sizes": {str(k): v for k, v in sorted(self._sizes.items())},
            },
        )
        await cancel_and_wait(self._task)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(Unavailable("the embedder shut down before this request ran"))
        # A batch still on the thread finishes there; nobody waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._queue.next_batch(self._clock())
            if batch is None:
                if not self._queue.waiting:
                    self._idle.set()
                self._wakeup.clear()
                wake_at = self._queue.wake_at()
                timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                continue
            self._running = batch
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode, batch.texts)
                finished = self._queue.complete(batch, vectors)
            except Exception as exc:
                logger.exception("encode failed for a batch of %d inputs", len(batch))
                for job in self._queue.fail(batch):
                    self._settle(job, exc)
            else:
                self._batches += 1
                self._sizes[len(batch)] += 1
                BATCH_SIZE.observe(len(batch))
                BATCH_TOKENS.observe(batch.cost)
                self._meter.add(len(batch), self._clock())
                for job in finished:
                    self._settle(job, None)
            finally:
                self._running = None

    def _settle(self, job: Job[V], error: Exception | None) -> None:
        future = self._futures.get(job)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            # complete() hands a job back only once every slot holds a vector.
            future.set_result(cast("list[V]", list(job.results)))
