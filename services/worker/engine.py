"""The engine: one asyncio task that owns the model and runs sequences through it.

Requests queue in order; the task takes one at a time, prefills it in chunks and
decodes it token by token. Every forward pass runs on a dedicated model thread,
so the event loop (health, other RPCs, streaming) stays responsive. Between two
passes the task checks for cancellation, so an abandoned request stops at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol, TypeVar

from services.common.errors import ResourceExhausted, Unavailable
from services.worker.meter import SpeedMeter
from services.worker.sequence import Delta, Finish, GenSequence

logger = logging.getLogger(__name__)

T = TypeVar("T")


def model_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs torch work: loading and every forward pass.

    On CPU torch parallelises with OpenMP, and each thread that runs torch ops gets
    its own team of helper threads. Once there are more of those than cores, libgomp
    stops spin-waiting between parallel regions, which costs about a third of the
    decode speed here. One model thread keeps it to one team.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-model")


class Runner(Protocol):
    def prefill(self, token_ids: Sequence[int], start: int) -> None: ...

    def sample_next(
        self, seq: GenSequence, token_ids: Sequence[int], start: int
    ) -> tuple[int, float | None]: ...


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    running_tokens: int
    waiting_tokens: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    draining: bool


class RequestHandle:
    """The consumer's side of one request: its deltas in order, ending with the finished one."""

    def __init__(self, seq: GenSequence) -> None:
        self.seq = seq
        self.cancelled = False
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, item: Delta | BaseException) -> None:
        self._queue.put_nowait(item)

    async def deltas(self) -> AsyncIterator[Delta]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish is not None:
                    return
        finally:
            # Reached when the consumer stops early too (client gone, deadline): free the engine.
            if self.seq.finish is None:
                self.cancel()


class Engine:
    def __init__(
        self,
        runner: Runner,
        *,
        max_waiting: int = 256,
        prefill_chunk_tokens: int = 512,
        on_crash: Callable[[BaseException], None] | None = None,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._runner = runner
        self._max_waiting = max_waiting
        self._chunk = prefill_chunk_tokens
        self._on_crash = on_crash
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: RequestHandle | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="worker-model"
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.draining = False
        self.decode_meter = SpeedMeter()
        self.prefill_meter = SpeedMeter()
        # Forward passes finished so far; the health probe reads progress from it.
        self.passes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="worker-engine")
        self._task.add_done_callback(self._task_done)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def submit(self, seq: GenSequence) -> RequestHandle:
        if self.draining or self._stopping:
            raise Unavailable("worker is draining: send the request to another worker")
        if not self.alive:
            raise Unavailable("worker engine is not running")
        if len(self._waiting) >= self._max_waiting:
            raise ResourceExhausted(
                f"{len(self._waiting)} requests already waiting (limit {self._max_waiting})",
                retry_after_ms=self._retry_after_ms(),
            )
        handle = RequestHandle(seq)
        self._waiting.append(handle)
        self._idle.clear()
        self._wakeup.set()
        return handle

    def load(self) -> EngineLoad:
        running = self._running
        # Cancelled requests stay queued until the loop reaches them, but are no work.
        waiting = [h.seq for h in self._waiting if not h.cancelled]
        return EngineLoad(
            running=0 if running is None else 1,
            waiting=len(waiting),
            running_tokens=0 if running is None else running.seq.remaining,
            waiting_tokens=sum(len(seq.prefix_ids) + seq.max_new_tokens for seq in waiting),
            decode_tokens_per_s=self.decode_meter.rate,
            prefill_tokens_per_s=self.prefill_meter.rate,
            draining=self.draining,
        )

    def drain(self) -> None:
        """Refuse new requests from now on; queued and running ones still finish."""
        self.draining = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop(self) -> None:
        """Abandon what is left and release the model thread."""
        self._stopping = True
        unfinished = [*self._waiting, *([self._running] if self._running else [])]
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        gone = Unavailable("worker stopped before finishing the request")
        for handle in unfinished:
            handle.put(gone)
        self._waiting.clear()
        self._running = None
        self._idle.set()
        # The model thread may be inside a forward pass; wait for it off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _loop(self) -> None:
        while True:
            while not self._waiting:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            handle = self._waiting.popleft()
            if handle.cancelled:
                continue
            self._running = handle
            try:
                await self._run(handle)
            except Exception as exc:  # the request fails, the engine goes on
                logger.exception("generation failed", extra={"request_id": handle.seq.request_id})
                handle.put(exc)
            finally:
                self._running = None

    async def _run(self, handle: RequestHandle) -> None:
        seq = handle.seq
        ids = seq.prefix_ids
        start = 0
        # All but the last chunk fill the cache only; the last one also samples the first token.
        while len(ids) - start > self._chunk:
            if handle.cancelled:
                return self._cancelled(seq)
            await self._timed(
                self.prefill_meter, self._chunk, self._runner.prefill, ids[start : start + self._chunk], start
            )
            start += self._chunk
        chunk = ids[start:]
        while True:
            if handle.cancelled:
                return self._cancelled(seq)
            meter = self.prefill_meter if len(chunk) > 1 else self.decode_meter
            token, logprob = await self._timed(meter, len(chunk), self._runner.sample_next, seq, chunk, start)
            start += len(chunk)
            delta = seq.append(token, logprob)
            if delta is not None:
                handle.put(delta)
            if seq.finish is not None:
                return None
            chunk = [token]

    async def _timed(self, meter: SpeedMeter, tokens: int, fn: Callable[..., T], *args: object) -> T:
        started = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        meter.add(tokens, time.perf_counter() - started)
        self.passes += 1
        return result

    def _cancelled(self, seq: GenSequence) -> None:
        seq.end(Finish.CANCELLED)
        logger.info(
            "request cancelled",
            extra={"request_id": seq.request_id, "completion_tokens": seq.completion_tokens},
        )

    def _retry_after_ms(self) -> int:
        """Rough time until a queue slot frees: the running request's remaining tokens at measured speed."""
        rate = self.decode_meter.rate
        remaining = self._running.seq.remaining if self._running else 1
        return max(100, int(1000 * remaining / rate)) if rate > 0 else 1000

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        logger.error("engine task died", exc_info=exc)
        if self._on_crash is not None and exc is not None:
            self._on_crash(exc)
