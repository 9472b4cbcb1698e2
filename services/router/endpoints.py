"""Keeps the registry current and places requests on it.

One task per worker or embedder follows its gRPC health and its StreamLoad reports,
learning its models from GetInfo, and reconnects with backoff when the connection breaks.
The monitor also owns the channels that requests to those endpoints travel on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc
from services.common.errors import Unavailable
from services.common.server import DEFAULT_MAX_MESSAGE_BYTES
from services.common.telemetry import client_interceptors, span
from services.common.tls import TlsConfig, aio_channel
from services.router import convert
from services.router.core.domain import EndpointKind
from services.router.core.load import ClusterLoad, LoadModel
from services.router.core.placement import Ask, PlacementPolicy, create_placement_policy, fitting
from services.router.core.registry import Placed, Registry
from services.router.metrics import FAILOVERS

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INITIAL_BACKOFF_S = 0.1
_PROTOCOLS: dict[EndpointKind, tuple[Any, Any]] = {
    EndpointKind.WORKER: (worker_pb2_grpc.WorkerStub, worker_pb2),
    EndpointKind.EMBEDDER: (embedder_pb2_grpc.EmbedderStub, embedder_pb2),
}


def channel_options(backoff_max_s: float) -> list[tuple[str, int]]:
    # gRPC's own reconnect backoff grows to minutes by default; a restarted endpoint
    # should be found again within our backoff.
    backoff_max_ms = max(100, int(backoff_max_s * 1000))
    return [
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", backoff_max_ms),
    ]


# Where one request went, and what it added to that endpoint's backlog.
Placement = Placed


class Backoff:
    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self.max_s, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s


class _NotReady(Exception):
    pass


class EndpointMonitor:
    def __init__(
        self,
        *,
        workers: Sequence[str],
        embedders: Sequence[str],
        report_interval_ms: int,
        stale_after_s: float,
        rpc_timeout_s: float,
        backoff_max_s: float,
        policy: PlacementPolicy | None = None,
        load_model: LoadModel | None = None,
        waiting_window_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        eject_after_errors: int = 3,
        eject_s: float = 5.0,
        tls: TlsConfig | None = None,
    ) -> None:
        self.tls = tls or TlsConfig()
        self.registry = Registry(
            stale_after_s, eject_after_errors, eject_s, waiting_window_s=waiting_window_s
        )
        # The one load model: placement, admission, the ladder and deadlines all predict with it.
        self.load_model = load_model or LoadModel()
        self.report_interval_ms = report_interval_ms
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_max_s = backoff_max_s
        self.policy = policy or create_placement_policy(model=self.load_model)
        self.clock = clock
        self._kinds: dict[str, EndpointKind] = {}
        for kind, addresses in ((EndpointKind.WORKER, workers), (EndpointKind.EMBEDDER, embedders)):
            for address in addresses:
                self.registry.add(address, kind)
                self._kinds[address] = kind
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._follows: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for address, kind in self._kinds.items():
            self._open(address, kind)

    def _open(self, address: str, kind: EndpointKind) -> None:
        self._channels[address] = aio_channel(
            address,
            self.tls,
            options=channel_options(self.backoff_max_s),
            interceptors=client_interceptors(),
        )
        self._follows[address] = asyncio.create_task(self._follow(address, kind), name=f"follow {address}")

    async def stop(self) -> None:
        tasks = [*self._follows.values(), *self._closing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._follows.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # --- service discovery (see discovery.py) ------------------------------------------------

    def add_endpoint(self, address: str, kind: EndpointKind) -> None:
        """Follow an endpoint found after start; one retired earlier comes back."""
        if address in self._follows:
            return
        if address in self._kinds:
            self.registry.restore(address)
        else:
            self.registry.add(address, kind)
            self._kinds[address] = kind
        self._open(address, kind)

    def retire_endpoint(self, address: str, grace_s: float) -> None:
        """No new requests to `address`; its channel closes once in-flight streams had grace_s."""
        follow = self._follows.pop(address, None)
        if follow is None:
            return
        follow.cancel()
        self.registry.retire(address)
        channel = self._channels[address]
        task = asyncio.create_task(self._close_later(address, channel, grace_s), name=f"retire {address}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_later(self, address: str, channel: grpc.aio.Channel, grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        if self._channels.get(address) is channel:
            del self._channels[address]
        await channel.close()

    def stub(self, address: str) -> Any:
        stub_cls, _ = _PROTOCOLS[self._kinds[address]]
        return stub_cls(self._channels[address])

    def place(
        self, kind: EndpointKind, model_id: str, exclude: frozenset[str] = frozenset(), ask: Ask | None = None
    ) -> Placement:
        """Address of the endpoint that gets the request; UNAVAILABLE naming the model if none can."""
        with span("placement", kind=kind.value, model=model_id):
            return self._place(kind, model_id, exclude, ask or Ask())

    def _place(self, kind: EndpointKind, model_id: str, exclude: frozenset[str], ask: Ask) -> Placement:
        now = self.clock()
        candidates = self.registry.candidates(kind, model_id, now, exclude)
        if not candidates:
            raise Unavailable(
                f"model {model_id!r} has no healthy {kind.value} ({self.registry.describe(kind, now)})"
            )
        fit, reasons = fitting(candidates, ask.needs)
        if not fit:
            raise Unavailable(
                f"model {model_id!r} has no {kind.value} that can hold the request ({'; '.join(reasons)})"
            )
        address = self.policy.choose(fit, ask).address
        return self.registry.on_placed(address, ask.prompt_tokens + ask.max_tokens, now, ask.prompt_tokens)

    def cluster(self, kind: EndpointKind = EndpointKind.WORKER) -> ClusterLoad:
        """The usable endpoints of `kind` together, as the load model sees them now."""
        return self.load_model.cluster(self.registry.loads(kind, self.clock()))

    def release(self, placement: Placement) -> None:
        """The request placed by `placement` is over (finished, failed or cancelled)."""
        self.registry.on_released(placement)

    async def dispatch(
        self,
        kind: EndpointKind,
        model_id: str,
        attempt: Callable[[Placement], Awaitable[T]],
        attempts: int,
        ask: Ask | None = None,
        *,
        hold: bool = False,
    ) -> T:
        """Run `attempt(placement)` on a placed endpoint; on UNAVAILABLE, on another, up to `attempts`.

        The placement is released when the attempt returns, unless `hold`: a stream keeps it
        until it ends, and its caller releases it then (`release`).
        """
        tried: set[str] = set()
        failure: tuple[str, grpc.aio.AioRpcError] | None = None
        while len(tried) < attempts:
            try:
                placement = self.place(kind, model_id, frozenset(tried), ask)
            except Unavailable:
                if failure is None:
                    raise
                break
            address = placement.address
            tried.add(address)
            try:
                result = await attempt(placement)
            except BaseException as exc:
                self.release(placement)
                if not isinstance(exc, grpc.aio.AioRpcError) or exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
                failure = (address, exc)
                if self.registry.on_error(address, self.clock()):
                    logger.warning("%s %s ejected after repeated failures", kind.value, address)
                logger.warning("%s %s unavailable for a request: %s", kind.value, address, exc.details())
                FAILOVERS.labels(kind.value, "unavailable_at_dispatch").inc()
                continue
            if not hold:
                self.release(placement)
            self.registry.on_success(address)
            return result
        assert failure is not None
        failed_address, error = failure
        raise Unavailable(f"{kind.value} {failed_address} is unavailable: {error.details()}")

    async def _follow(self, address: str, kind: EndpointKind) -> None:
        backoff = Backoff(_INITIAL_BACKOFF_S, self.backoff_max_s)
        while True:
            try:
                await self._session(address, kind, backoff)
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except _NotReady as exc:
                reason = str(exc)
            # Retries against an endpoint that is not up yet would flood the log.
            log = logger.warning if self.registry.on_down(address, reason) else logger.debug
            log("%s %s is down: %s", kind.value, address, reason)
            await asyncio.sleep(backoff.next())

    async def _session(self, address: str, kind: EndpointKind, backoff: Backoff) -> None:
        """One connection's life: health, models, then load reports until something breaks."""
        channel = self._channels[address]
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=self.rpc_timeout_s)
        if checked.status != health_pb2.HealthCheckResponse.SERVING:
            raise _NotReady("health is not SERVING")
        stub_cls, messages = _PROTOCOLS[kind]
        stub = stub_cls(channel)
        info = await stub.GetInfo(messages.GetInfoRequest(), timeout=self.rpc_timeout_s)
        self.registry.on_info(address, info.endpoint_id, convert.models_from_pb(info.models))
        tasks = [
            asyncio.create_task(self._follow_load(address, kind, stub, messages, backoff)),
            asyncio.create_task(self._watch_health(health)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also lets go of a draining endpoint: open streams would hold up its shutdown.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()

    async def _follow_load(
        self, address: str, kind: EndpointKind, stub: Any, messages: Any, backoff: Backoff
    ) -> None:
        call = stub.StreamLoad(messages.StreamLoadRequest(interval_ms=self.report_interval_ms))
        try:
            first = True
            while (report := await call.read()) is not grpc.aio.EOF:
                self.registry.on_report(address, convert.load_from_pb(report), self.clock())
                if first:
                    first = False
                    backoff.reset()
                    logger.info("%s %s is up", kind.value, address)
        finally:
            call.cancel()
        raise _NotReady("load report stream ended")

    async def _watch_health(self, health: health_pb2_grpc.HealthStub) -> None:
        # A draining endpoint turns NOT_SERVING before its load reports say so.
        call = health.Watch(health_pb2.HealthCheckRequest())
        try:
            while (update := await call.read()) is not grpc.aio.EOF:
                if update.status != health_pb2.HealthCheckResponse.SERVING:
                    raise _NotReady("health turned NOT_SERVING (draining or stopping)")
        finally:
            call.cancel()
        raise _NotReady("health watch ended")
