"""Run as a script by test_tracing_server.py (tracing is per process): a GrpcServer with
tracing on, called with a caller's traceparent; prints what the spans and calls were."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import telemetry
from services.common.server import GrpcServer
from services.router.admission import Admission
from services.router.core.load import ClusterLoad
from services.router.core.queues import Priority, QueueConfig, QueuedRequest, create_request_queue

SERVICE = "test.tracing.v1.Probe"
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


async def _generator(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    with telemetry.span("inner step"):
        yield b"a"
    yield b"b"


async def _writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"w")


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        "Generator": grpc.unary_stream_rpc_method_handler(_generator),
        "Writer": grpc.unary_stream_rpc_method_handler(_writer),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def _queue_wait() -> None:
    """A request that waits for the router's only slot, inside a request span."""
    cluster = ClusterLoad(workers=1, slots=1, tokens_per_s=10.0)
    admission = Admission(create_request_queue("priority", QueueConfig(), lambda: cluster))

    def request(request_id: str) -> QueuedRequest:
        return QueuedRequest(request_id, "t", Priority.STANDARD, 10, enqueued_at=time.monotonic())

    async def second() -> None:
        async with admission.slot(request("second"), 5.0):
            pass

    with trace.get_tracer("test").start_as_current_span("queued request"):
        async with admission.slot(request("first"), 5.0):
            waiting = asyncio.create_task(second())
            await asyncio.sleep(0.05)
        await waiting


async def main() -> None:
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing("probe", "", exporter=exporter)
    server = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE], register=_register)
    await server.start()
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    results: dict[str, object] = {}
    async with grpc.aio.insecure_channel(server.address) as channel:
        generator = channel.unary_stream(f"/{SERVICE}/Generator")
        results["generator"] = [m.decode() async for m in generator(b"", metadata=metadata, timeout=5)]
        writer = channel.unary_stream(f"/{SERVICE}/Writer")
        results["writer"] = [m.decode() async for m in writer(b"", metadata=metadata, timeout=5)]
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        results["watch"] = health_pb2.HealthCheckResponse.ServingStatus.Name((await watch.read()).status)
        watch.cancel()
    await server.stop(0)
    await _queue_wait()
    telemetry.shutdown_tracing()
    results["spans"] = [
        {
            "name": s.name,
            "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent_id": format(s.parent.span_id, "016x") if s.parent else "",
        }
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
