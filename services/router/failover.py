"""Mid-stream failover: a worker's Generate stream watched for breaks and stalls, and the
request that continues it elsewhere from the tokens the client already has.

The worker prefills prompt + `resume_token_ids` and samples the next token at the same
step index with the same seed, so the continuation is token-exact; a sampled request
without a seed gets one here for that reason.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc

from services.common.errors import ResourceExhausted, Unavailable
from services.router import convert
from services.router.core.domain import Degradation, DegradationStep, Delta, EndpointKind, WorkerRequest
from services.router.core.placement import Ask
from services.router.endpoints import EndpointMonitor

logger = logging.getLogger(__name__)

# Statuses of a stream that broke under the request (process gone, connection reset,
# server stopped), as opposed to the worker's own verdict on the request.
_BROKEN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class StreamBroken(Exception):
    """The worker stream cannot go on; `reason` is a short label (metrics, logs).

    `retry_after_ms` is set when the worker refused the request for being full: another
    worker may take it, and if none can, the caller is told to come back later.
    """

    def __init__(self, reason: str, detail: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retry_after_ms = retry_after_ms


_MIN_RETRY_AFTER_MS = 100


def _full(exc: grpc.aio.AioRpcError) -> StreamBroken:
    """A worker's RESOURCE_EXHAUSTED, with its pushback (or a short one when it gave none)."""
    pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    try:
        retry_after_ms = max(_MIN_RETRY_AFTER_MS, int(str(pushback)))
    except ValueError:
        retry_after_ms = _MIN_RETRY_AFTER_MS
    return StreamBroken("worker_full", exc.details() or "RESOURCE_EXHAUSTED", retry_after_ms)


def broken(exc: grpc.aio.AioRpcError) -> StreamBroken | None:
    """The failover reason for an RPC error, or None when the error is the worker's answer."""
    if exc.code() not in _BROKEN:
        return None
    return StreamBroken(exc.code().name.lower(), exc.details() or exc.code().name)


def pin_seed(request: WorkerRequest) -> WorkerRequest:
    """A sampled request without a seed given one, so another worker can continue it exactly."""
    sampling = request.sampling
    if sampling.temperature and sampling.seed is None:
        return replace(request, sampling=replace(sampling, seed=random.getrandbits(63)))
    return request


class WatchedStream:
    """Reads one worker stream; a watchdog cancels it when it waits too long, and the read
    then raises StreamBroken.

    Too long means `stall_timeout_s` without a message once tokens flow; before the first
    one, the worker may be busy with a long prompt or a queue, so the wait only counts
    once the endpoint itself is no longer usable (its reports stopped, it went down or it
    was ejected). A stall is only given up on when `can_move` says another worker could
    take over: a slow worker is better than none. Reads go straight to the call, so
    watching costs nothing per token.
    """

    def __init__(
        self,
        call: Any,
        address: str,
        usable: Callable[[], bool],
        stall_timeout_s: float,
        can_move: Callable[[], bool] = lambda: True,
        check_interval_s: float = 0.1,
    ) -> None:
        self.call = call
        self.address = address
        self._usable = usable
        self._can_move = can_move
        self._stall_timeout_s = stall_timeout_s
        self._check_interval_s = min(check_interval_s, stall_timeout_s)
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._flowing = False
        self._stalled: StreamBroken | None = None
        self._watchdog = self._loop.create_task(self._watch(), name=f"watch {address}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            gap = self._loop.time() - self._last
            stalled = gap >= self._stall_timeout_s and (self._flowing or not self._usable())
            if stalled and self._can_move():
                what = "no token" if self._flowing else "no first token and the worker is unusable"
                self._stalled = StreamBroken("stalled", f"{what} for {gap:.1f}s")
                self.call.cancel()
                return

    async def read(self) -> Any:
        """The next message, or grpc.aio.EOF; StreamBroken when the stream broke or stalled."""
        try:
            message = await self.call.read()
        except asyncio.CancelledError:
            # The watchdog cancelled the call; any other cancellation is the caller's own.
            if self._stalled is not None:
                raise self._stalled from None
            raise
        except grpc.aio.AioRpcError as exc:
            failure = self._stalled or broken(exc)
            if failure is None and exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and not self._flowing:
                failure = _full(exc)
            if failure is None:
                raise
            raise failure from None
        if self._stalled is not None:
            raise self._stalled
        self._last = self._loop.time()
        self._flowing = True
        return message

    def cancel(self) -> None:
        self._watchdog.cancel()
        self.call.cancel()


@dataclass(frozen=True)
class Relayed:
    """One piece of a reply on its way to the client, with where it came from."""

    delta: Delta
    address: str  # "" when no worker produced it (the reply cache)
    # Set on the first message from a worker that took over a broken stream.
    moved: Degradation | None = None


class Failover:
    """Streams a Generate from placed workers, moving it to another one when its stream breaks.

    Messages reach the caller as they come; the tokens in them are what a successor
    resumes from, so the caller sees no token twice and none missing.
    """

    def __init__(
        self,
        endpoints: EndpointMonitor,
        *,
        stall_timeout_s: float,
        attempts: int,
        on_failover: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.stall_timeout_s = stall_timeout_s
        self.attempts = attempts  # workers tried in all, the first one included
        self.on_failover = on_failover
        self.counts: collections.Counter[str] = collections.Counter()

    def _usable(self, address: str) -> bool:
        return self.endpoints.registry.is_usable(address, self.endpoints.clock())

    def _elsewhere(self, model_id: str, exclude: frozenset[str]) -> bool:
        """Whether a worker other than those in `exclude` could take the request now."""
        now = self.endpoints.clock()
        return bool(self.endpoints.registry.candidates(EndpointKind.WORKER, model_id, now, exclude))

    async def stream(
        self,
        request: WorkerRequest,
        ask: Ask,
        remaining: Callable[[], float | None],
    ) -> AsyncIterator[Relayed]:
        registry = self.endpoints.registry
        clock = self.endpoints.clock
        model_id = request.model
        request = pin_seed(request)
        delivered: list[int] = []
        failed: list[str] = []
        moved: Degradation | None = None
        last_failure: StreamBroken | None = None
        while True:
            try:
                placement = self.endpoints.place(EndpointKind.WORKER, model_id, frozenset(failed), ask)
            except Unavailable as exc:
                if last_failure is None:
                    raise
                if last_failure.retry_after_ms is not None:
                    raise _refused(failed[-1], last_failure) from None
                raise Unavailable(
                    f"worker {failed[-1]} failed ({last_failure}) and no other worker can continue "
                    f"the request: {exc.message}"
                ) from None
            address = placement.address
            attempt = convert.worker_request_to_pb(request, delivered)
            call = self.endpoints.stub(address).Generate(attempt, timeout=remaining())
            stream = WatchedStream(
                call,
                address,
                functools.partial(self._usable, address),
                self.stall_timeout_s,
                functools.partial(self._elsewhere, model_id, frozenset([*failed, address])),
            )
            try:
                while (resp := await stream.read()) is not grpc.aio.EOF:
                    delta = convert.delta_from_pb(resp)
                    delivered.extend(delta.token_ids)
                    yield Relayed(delta, address, moved)
                    moved = None
                    if delta.finish is not None:
                        registry.on_success(address)
                        return
                raise StreamBroken("ended_early", "the stream ended without a finish reason")
            except StreamBroken as exc:
                last_failure = exc
                failed.append(address)
                # A full worker is busy, not broken.
                if exc.retry_after_ms is None and registry.on_error(address, clock()):
                    logger.warning("worker %s ejected after repeated failures", address)
                started = bool(delivered)
                label = exc.reason if started else f"{exc.reason}_before_first_token"
                self.counts[label] += 1
                if self.on_failover is not None:
                    self.on_failover(label)
                logger.warning(
                    "worker %s failed after %d tokens (%s); moving the request", address, len(delivered), exc
                )
                if len(failed) >= self.attempts:
                    if exc.retry_after_ms is not None:
                        raise _refused(address, exc) from None
                    raise Unavailable(
                        f"worker {address} failed ({exc}); no more workers tried "
                        f"(failover_attempts={self.attempts})"
                    ) from None
                if started and moved is None:
                    moved = Degradation(
                        DegradationStep.FAILOVER,
                        f"worker {address} failed after {len(delivered)} tokens ({exc.reason}); "
                        "continued on another worker from there",
                    )
            finally:
                stream.cancel()
                self.endpoints.release(placement)


def _refused(address: str, failure: StreamBroken) -> ResourceExhausted:
    assert failure.retry_after_ms is not None
    return ResourceExhausted(
        f"worker {address} is full ({failure.detail}) and no other worker could take the request",
        failure.retry_after_ms,
    )
