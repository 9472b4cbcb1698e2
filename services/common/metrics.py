"""Prometheus metrics shared by every service: the /metrics HTTP endpoint, gRPC server
metrics by method and code, and gauges read from a service's own load report.

Series defined at module level (counters, histograms) live in prometheus-client's default
registry, one per process; what belongs to one server (its load report) is a collector
handed to that server's `MetricsEndpoint`. `metrics_port = 0` turns the endpoint off.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Seconds: from sub-millisecond unary calls to minutes-long streams.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# time.perf_counter() when the current RPC reached the server (before any auth or quota step).
rpc_started_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("rpc_started", default=None)

GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status (whole stream for streaming RPCs).",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)


class MetricsEndpoint:
    """The HTTP /metrics endpoint of one server: the process's series plus its own collectors."""

    def __init__(self, host: str, port: int, collectors: Iterable[Collector] = ()) -> None:
        self.host = host
        self.port = port
        self.collectors = list(collectors)
        self._server: Any = None

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        for collector in self.collectors:
            yield from collector.collect()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self.port == 0 or self._server is not None:
            return
        self._server, _ = start_http_server(self.port, self.host, registry=self)
        logger.info("metrics serving", extra={"metrics_address": f"{self.host}:{self.port}"})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _code(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(failed, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN" if failed is not None else "OK"


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that stands `wrap(path, handler)` in for each RPC's handler."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler_call_details.method, handler)

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class GrpcMetricsInterceptor(HandlerInterceptor):
    """Counts and times every RPC by service, method, type and final status code."""

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = path.lstrip("/").rpartition("/")
        kind = _rpc_type(handler)
        labels = (service, method, kind)
        behavior, factory = handler_behavior(handler)
        if inspect.isasyncgenfunction(behavior):

            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, failed = _begin(labels), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    _end(labels, started, _code(context, failed))

            wrapped: Callable[..., Any] = streamed
        else:

            async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, failed = _begin(labels), None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    _end(labels, started, _code(context, failed))

            wrapped = awaited
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def checked_first(
    handler: grpc.RpcMethodHandler,
    check: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with `check(request, context)` awaited before it runs (it aborts the call to
    refuse it); for unary requests only. `request_deserializer` replaces the handler's."""
    behavior, factory = handler_behavior(handler)
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(request, context)
            async for item in behavior(request, context):
                yield item

        wrapped: Callable[..., Any] = streamed
    else:

        async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await behavior(request, context)

        wrapped = awaited
    return factory(
        wrapped,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def handler_behavior(handler: grpc.RpcMethodHandler) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The handler's function and the grpc factory that builds a handler of its kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _begin(labels: tuple[str, str, str]) -> float:
    GRPC_STARTED.labels(*labels).inc()
    started = time.perf_counter()
    # Each RPC runs in a task of its own, so this is the current RPC's for the handler's whole run.
    rpc_started_var.set(started)
    return started


def _end(labels: tuple[str, str, str], started: float, code: str) -> None:
    GRPC_HANDLING.labels(*labels).observe(time.perf_counter() - started)
    GRPC_HANDLED.labels(*labels, code).inc()


class LoadReportCollector:
    """Gauges read from the `infermesh.common.v1.LoadReport` a worker or embedder streams to
    routers, at scrape time: the same numbers placement sees, from the same place."""

    def __init__(self, report: Callable[[], Any]) -> None:
        self._report = report

    def collect(self) -> Iterator[Metric]:
        try:
            r = self._report()
        except Exception:  # a scrape must never take the service down
            logger.exception("load report for metrics failed")
            return
        model = r.models[0].id if r.models else ""
        device = r.device.name if r.HasField("device") else ""

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([model], value)
            return family

        yield gauge("infermesh_running_sequences", "Sequences (or items) in the running batch.", r.running)
        yield gauge("infermesh_waiting_sequences", "Requests queued, not yet started.", r.waiting)
        yield gauge(
            "infermesh_running_tokens", "Tokens still to generate for running sequences.", r.running_tokens
        )
        yield gauge(
            "infermesh_waiting_tokens", "Prompt plus max tokens of waiting requests.", r.waiting_tokens
        )
        kv = GaugeMetricFamily(
            "infermesh_kv_cache_blocks", "KV cache blocks by state.", labels=["model", "state"]
        )
        kv.add_metric([model, "free"], r.kv_blocks_free)
        kv.add_metric([model, "used"], max(0, r.kv_blocks_total - r.kv_blocks_free))
        yield kv
        yield gauge(
            "infermesh_prefix_cache_hit_ratio",
            "Share of prompt tokens (embedder: inputs) served from cache.",
            r.prefix_cache_hit_rate,
        )
        speed = GaugeMetricFamily(
            "infermesh_throughput_tokens_per_second",
            "Measured speed while busy, by phase.",
            labels=["model", "phase"],
        )
        speed.add_metric([model, "decode"], r.decode_tokens_per_s)
        speed.add_metric([model, "prefill"], r.prefill_tokens_per_s)
        yield speed
        yield gauge("infermesh_items_per_second", "Inputs encoded per second (embedder).", r.items_per_s)
        yield gauge("infermesh_draining", "1 while the endpoint drains.", float(r.draining))
        if device:
            memory = GaugeMetricFamily(
                "infermesh_device_memory_bytes",
                "Accelerator memory by state (0 where the device does not say).",
                labels=["model", "device", "state"],
            )
            memory.add_metric([model, device, "used"], r.device.memory_used_bytes)
            memory.add_metric([model, device, "total"], r.device.memory_total_bytes)
            yield memory
