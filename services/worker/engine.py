"""The engine: one asyncio task that owns the scheduler and steps every sequence through the model.

Continuous batching: each step the pure scheduler picks chunks from every running
sequence (decodes, and prompt chunks of newly admitted ones) within a token budget,
the model thread runs them as one batch, and the sampled tokens go back to the
scheduler and out to their streams. Requests join and leave between steps.

Only this task touches the scheduler, and only between steps or inside the step it
runs on the model thread: `submit` and `cancel` just leave notes for it, so the
event loop never races the model thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.worker.core.scheduler import AdmissionError, Scheduler
from services.worker.meter import SpeedMeter, StepTimeModel
from services.worker.sequence import Delta, Finish, GenSequence
from services.worker.step import StepExecutor, StepResult, run_step, state_for

logger = logging.getLogger(__name__)


def model_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs torch work: loading and every forward pass.

    On CPU torch parallelises with OpenMP, and each thread that runs torch ops gets
    its own team of helper threads. Once there are more of those than cores, libgomp
    stops spin-waiting between parallel regions, which costs about a third of the
    decode speed here. One model thread keeps it to one team.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-model")


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    running_tokens: int
    waiting_tokens: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    draining: bool
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    decode_step_fixed_s: float = 0.0
    decode_step_per_sequence_s: float = 0.0
    decode_step_batch: float = 0.0  # mean batch of the fitted steps


class RequestHandle:
    """The consumer's side of one request: its deltas in order, ending with the finished one."""

    def __init__(self, key: str, seq: GenSequence, wakeup: asyncio.Event) -> None:
        self.key = key
        self.seq = seq
        self.cancelled = False
        self._wakeup = wakeup
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled = True
        # The engine may be idle-waiting; the blocks must come back within a step either way.
        self._wakeup.set()

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
        step_executor: StepExecutor,
        scheduler: Scheduler,
        *,
        on_crash: Callable[[BaseException], None] | None = None,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._step_executor = step_executor
        self._scheduler = scheduler
        self._max_waiting = scheduler.limits.max_waiting
        self._capacity = scheduler.blocks.num_blocks * scheduler.blocks.block_size
        self._on_crash = on_crash
        # Submitted, not yet handed to the scheduler (that happens between steps).
        self._pending: list[RequestHandle] = []
        # Every request the scheduler holds, by engine key (client request ids need not be unique).
        self._handles: dict[str, RequestHandle] = {}
        self._seqs: dict[str, GenSequence] = {}
        self._keys = (f"s{n}" for n in itertools.count(1))
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = executor or model_thread()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.draining = False
        self.decode_meter = SpeedMeter()
        self.prefill_meter = SpeedMeter()
        self.step_model = StepTimeModel()
        # Forward passes finished so far; the health probe reads progress from it.
        self.passes = 0
        self.preemptions = 0
        # Passes given up part-way for an urgent arrival (their work is done again).
        self.interrupted_passes = 0
        # An urgent request was submitted since the running step began (read by the model thread).
        self._urgent_arrived = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="worker-engine")
        self._task.add_done_callback(self._task_done)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    def submit(self, seq: GenSequence) -> RequestHandle:
        if self.draining or self._stopping:
            raise Unavailable("worker is draining: send the request to another worker")
        if not self.alive:
            raise Unavailable("worker engine is not running")
        positions = len(seq.prefix_ids) + seq.remaining - 1
        if positions > self._capacity:
            raise InvalidArgument(
                "max_tokens",
                f"{len(seq.prefix_ids)} prompt tokens + max_tokens={seq.remaining} need {positions} "
                f"KV cache positions; this worker's cache holds {self._capacity}",
            )
        waiting = self._num_waiting()
        if waiting >= self._max_waiting:
            raise ResourceExhausted(
                f"{waiting} requests already waiting (limit {self._max_waiting})",
                retry_after_ms=self._retry_after_ms(),
            )
        handle = RequestHandle(next(self._keys), seq, self._wakeup)
        self._pending.append(handle)
        if seq.priority <= self._scheduler.limits.urgent_priority:
            self._urgent_arrived = True
        self._idle.clear()
        self._wakeup.set()
        return handle

    def load(self) -> EngineLoad:
        blocks = self._scheduler.blocks
        step_fixed_s, step_per_sequence_s = self.step_model.fit()
        running = self._running_seqs()
        # Cancelled requests stay queued until the loop reaches them, but are no work.
        waiting = [h.seq for h in self._waiting_handles() if not h.cancelled]
        return EngineLoad(
            running=len(running),
            waiting=len(waiting),
            running_tokens=sum(seq.remaining for seq in running),
            waiting_tokens=sum(len(seq.prefix_ids) + seq.remaining for seq in waiting),
            decode_tokens_per_s=self.decode_meter.rate,
            prefill_tokens_per_s=self.prefill_meter.rate,
            draining=self.draining,
            kv_blocks_free=blocks.num_free_blocks,
            kv_blocks_total=blocks.num_blocks,
            prefix_cache_hit_rate=blocks.prefix_hit_rate,
            decode_step_fixed_s=step_fixed_s,
            decode_step_per_sequence_s=step_per_sequence_s,
            decode_step_batch=self.step_model.mean_batch,
        )

    def forget_speed(self) -> None:
        """Drop what the meters measured so far (the warm-up pass pays one-time costs)."""
        self.decode_meter = SpeedMeter()
        self.prefill_meter = SpeedMeter()
        self.step_model = StepTimeModel()

    def drain(self) -> None:
        """Refuse new requests from now on; queued and running ones still finish."""
        self.draining = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop(self) -> None:
        """Abandon what is left and release the model thread."""
        self._stopping = True
        unfinished = [*self._pending, *self._handles.values()]
        if self._task is not None:
            self._task.cancel()
            # A task that died has been logged (and reported) by `_task_done` already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        gone = Unavailable("worker stopped before finishing the request")
        for handle in unfinished:
            handle.put(gone)
        self._pending.clear()
        self._handles.clear()
        self._seqs.clear()
        self._idle.set()
        # The model thread may be inside a forward pass; wait for it off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._reap_cancelled()
            self._admit_pending()
            if not self._scheduler.has_work():
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = time.perf_counter()
            # Urgent requests submitted from now on are not in this step: they may interrupt it.
            self._urgent_arrived = False
            result = await loop.run_in_executor(self._executor, self._step)
            self._account(result, time.perf_counter() - started)
            self._dispatch(result)

    def _step(self) -> StepResult:
        return run_step(self._scheduler, self._step_executor, self._seqs, lambda: self._urgent_arrived)

    def _admit_pending(self) -> None:
        pending, self._pending = self._pending, []
        for handle in pending:
            if handle.cancelled:
                self._cancelled(handle.seq)
                continue
            try:
                self._scheduler.add(state_for(handle.key, handle.seq))
            except (AdmissionError, ValueError) as exc:
                # `submit` checks what it can; whatever still does not fit fails this request only.
                handle.put(InvalidArgument("prompt", str(exc)))
                continue
            self._handles[handle.key] = handle
            self._seqs[handle.key] = handle.seq

    def _reap_cancelled(self) -> None:
        for key, handle in list(self._handles.items()):
            if handle.cancelled:
                self._scheduler.finish(key)
                self._forget(key)
                self._cancelled(handle.seq)

    def _dispatch(self, result: StepResult) -> None:
        for key, delta in result.deltas.items():
            handle = self._handles.get(key)
            if handle is None:
                continue
            handle.put(delta)
            if delta.finish is not None:
                self._forget(key)
        if result.error is not None:
            logger.error("forward pass failed", exc_info=result.error)
            for key in result.failed:
                handle = self._handles.get(key)
                if handle is not None:
                    handle.put(result.error)
                    self._forget(key)

    def _account(self, result: StepResult, seconds: float) -> None:
        # Preemptions happen when the step is scheduled: they stand even if its pass was given up.
        self.preemptions += result.preempted
        if result.interrupted:
            self.interrupted_passes += 1
            return
        self.passes += 1
        total = result.prefill_tokens + result.decode_tokens
        if result.decode_tokens and not result.prefill_tokens:
            self.step_model.add(result.decode_tokens, seconds)
        if total:
            # One pass computes both kinds; each meter gets the share of the time its tokens took.
            self.prefill_meter.add(result.prefill_tokens, seconds * result.prefill_tokens / total)
            self.decode_meter.add(result.decode_tokens, seconds * result.decode_tokens / total)

    def _forget(self, key: str) -> None:
        self._handles.pop(key, None)
        self._seqs.pop(key, None)

    def _cancelled(self, seq: GenSequence) -> None:
        seq.end(Finish.CANCELLED)
        logger.info(
            "request cancelled",
            extra={"request_id": seq.request_id, "completion_tokens": seq.completion_tokens},
        )

    def _running_seqs(self) -> list[GenSequence]:
        # A copy: the model thread may change the running list while the event loop reads it.
        return [self._seqs[s.request_id] for s in list(self._scheduler.running) if s.request_id in self._seqs]

    def _waiting_handles(self) -> list[RequestHandle]:
        queued = [
            self._handles[s.request_id]
            for s in list(self._scheduler.waiting)
            if s.request_id in self._handles
        ]
        return [*queued, *self._pending]

    def _num_waiting(self) -> int:
        return self._scheduler.num_waiting + len(self._pending)

    def _retry_after_ms(self) -> int:
        """Rough time until a queue slot frees: the running sequence closest to its end, at measured speed."""
        running = self._running_seqs()
        rate = self.decode_meter.rate
        if rate <= 0 or not running:
            return 1000
        per_sequence = rate / len(running)
        return min(30_000, max(100, int(1000 * min(seq.remaining for seq in running) / per_sequence)))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        logger.error("engine task died", exc_info=exc)
        # Nothing will step these again: end their streams now rather than at their deadlines,
        # so a router moves them to another worker at once.
        for handle in [*self._handles.values(), *self._pending]:
            handle.put(Unavailable("worker engine stopped: retry on another worker"))
        self._handles.clear()
        self._seqs.clear()
        self._pending.clear()
        if self._on_crash is not None and exc is not None:
            self._on_crash(exc)
