"""OpenTelemetry tracing across the mesh: one trace per request, router to every hop.

The entry point of each service calls `configure_tracing`; with no OTLP endpoint nothing is
installed, `span()` hands back one shared do-nothing object and no interceptor is added, so
tracing off costs next to nothing. On, the router continues the caller's W3C `traceparent` (or
starts a trace), every server opens a span per RPC (opentelemetry-instrumentation-grpc), and
the router's channels carry the current context to the session service, workers and embedders.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter

from services.common.metrics import GrpcMetricsInterceptor, handler_behavior

logger = logging.getLogger(__name__)

_TRACER_NAME = "infermesh"
# Long-lived or housekeeping streams: a span each would be a trace that never ends.
_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
_UNTRACED_METHODS = ("StreamLoad",)

_provider: Any = None
_NO_SPAN = nullcontext(trace.INVALID_SPAN)


def configure_tracing(service: str, otlp_endpoint: str, *, exporter: Any = None) -> bool:
    """Export spans to the OTLP/gRPC collector at `otlp_endpoint` (host:port), or to `exporter`
    (an SDK SpanExporter: tests, benchmarks); neither leaves tracing off. Once per process."""
    global _provider
    if not otlp_endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
    provider = TracerProvider(resource=Resource.create({"service.name": f"infermesh-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    logger.info("tracing on", extra={"otlp_endpoint": otlp_endpoint or type(exporter).__name__})
    return True


def tracing_enabled() -> bool:
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush spans still buffered (the provider also does it at exit)."""
    if _provider is not None:
        _provider.shutdown()


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[trace.Span]:
    """A child span of the current one, for a step of a request. While tracing is off this is
    one shared do-nothing context manager: not even the API's no-op tracer is called."""
    if _provider is None:
        return _NO_SPAN
    return trace.get_tracer(_TRACER_NAME).start_as_current_span(name, attributes=attributes)


def start_span(name: str, **attributes: str | int | float | bool) -> trace.Span:
    """A child span ended by the caller (`span.end()`), for steps that do not nest in a block."""
    if _provider is None:
        return trace.INVALID_SPAN
    return trace.get_tracer(_TRACER_NAME).start_span(name, attributes=attributes)


def trace_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, or ("", "") outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _traced(details: grpc.HandlerCallDetails) -> bool:
    service, _, method = details.method.lstrip("/").rpartition("/")
    return service not in _UNTRACED_SERVICES and method not in _UNTRACED_METHODS


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Every server's interceptors: a span per RPC when tracing is on (outermost), then metrics."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing_enabled():
        interceptors.append(_TracingInterceptor())
    interceptors.append(GrpcMetricsInterceptor())
    return interceptors


class _TracingInterceptor(grpc.aio.ServerInterceptor):
    """opentelemetry-instrumentation-grpc's aio server interceptor, for the handlers it can wrap:
    it iterates every response-streaming behaviour, so a streaming handler written as a
    coroutine (`context.write`, or one that only aborts) is left untraced rather than broken."""

    def __init__(self) -> None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        self._otel = aio_server_interceptor(filter_=_traced)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or (
            handler.response_streaming and not inspect.isasyncgenfunction(handler_behavior(handler)[0])
        ):
            return handler

        async def resolved(_: grpc.HandlerCallDetails) -> Any:
            return handler

        return await self._otel.intercept_service(resolved, handler_call_details)


def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
    propagate.inject(metadata, setter=_MetadataSetter())
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier[key] = value


class _PropagateUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_trace_context(client_call_details), request)


class _PropagateUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    # The call itself is returned (not an async generator around it), so `call.read()` still works.
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_trace_context(client_call_details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for channels to other services: they carry the current trace context.

    The library's client interceptors wrap streaming calls in async generators, which breaks
    the `call.read()` style the router relays with; the callee's server span is the hop.
    """
    if not tracing_enabled():
        return []
    return [_PropagateUnaryUnary(), _PropagateUnaryStream()]


class Phases:
    """Consecutive spans for the phases of one request (e.g. prefill, then decode): `next()`
    ends the current phase and opens the following one; `end()` ends whichever is open (once)."""

    def __init__(self, *names: str) -> None:
        self._names = list(names)
        self._span: trace.Span | None = start_span(self._names.pop(0))

    def next(self) -> None:
        if self._names and self._span is not None:
            self._span.end()
            self._span = start_span(self._names.pop(0))

    def end(self) -> None:
        if self._span is not None:
            self._span.end()
            self._span = None
