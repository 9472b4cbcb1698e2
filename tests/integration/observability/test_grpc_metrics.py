"""gRPC server metrics by method and final status code, and the /metrics endpoint, on a real
GrpcServer (port 0) with a real HTTP scrape."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from infermesh.common.v1 import common_pb2
from services.common.metrics import LoadReportCollector
from services.common.server import GrpcServer

SERVICE = "test.observability.v1.Probe"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"one"
    if request == b"fail":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: told to fail")
    if request == b"hang":
        await asyncio.sleep(60)
    yield b"two"


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"crash":
        raise RuntimeError("a bug")
    return request


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Echo": grpc.unary_unary_rpc_method_handler(_unary),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _report() -> common_pb2.LoadReport:
    return common_pb2.LoadReport(
        models=[common_pb2.ModelInfo(id="m1")],
        device=common_pb2.DeviceInfo(name="cpu", memory_total_bytes=1000, memory_used_bytes=250),
        running=3,
        waiting=2,
        kv_blocks_free=4,
        kv_blocks_total=10,
        prefix_cache_hit_rate=0.25,
        decode_tokens_per_s=42.0,
    )


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    # A free port can be taken by another process before the metrics server binds it: try again.
    for attempt in range(5):
        srv = GrpcServer(
            host="127.0.0.1",
            port=0,
            service_names=[SERVICE],
            register=_register,
            metrics_port=_free_port(),
            collectors=[LoadReportCollector(_report)],
        )
        try:
            await srv.start()
            break
        except OSError:
            await srv.stop(0)
            if attempt == 4:
                raise
    assert srv.metrics.serving
    yield srv
    await srv.stop(0)


def _samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _handled(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], method: str, code: str) -> float:
    for (name, labels), value in samples.items():
        labels_d = dict(labels)
        if name == "grpc_server_handled_total" and labels_d.get("grpc_method") == method:
            if labels_d["grpc_code"] == code:
                return value
    return 0.0


async def test_every_rpc_is_counted_by_method_and_final_code(server: GrpcServer) -> None:
    port = server.metrics.port
    before = await asyncio.to_thread(_samples, port)
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        assert [m async for m in stream(b"ok", timeout=5)] == [b"one", b"two"]
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            [m async for m in stream(b"fail", timeout=5)]
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        with pytest.raises(grpc.aio.AioRpcError):
            await echo(b"crash", timeout=5)
        call = stream(b"hang", timeout=5)
        assert await call.read() == b"one"
        call.cancel()
        await asyncio.sleep(0.3)
    after = await asyncio.to_thread(_samples, port)

    def delta(method: str, code: str) -> float:
        return _handled(after, method, code) - _handled(before, method, code)

    assert delta("Check", "OK") == 1
    assert delta("Check", "NOT_FOUND") == 1
    assert delta("Stream", "OK") == 1
    assert delta("Stream", "INVALID_ARGUMENT") == 1
    assert delta("Stream", "CANCELLED") == 1
    assert delta("Echo", "UNKNOWN") == 1
    started = ("grpc_server_started_total", "Stream", "server_stream")
    count = [
        v - before.get((n, labels), 0.0)
        for (n, labels), v in after.items()
        if n == started[0] and ("grpc_method", started[1]) in labels and ("grpc_type", started[2]) in labels
    ]
    assert count == [3]


async def test_load_report_gauges_are_read_at_scrape_time(server: GrpcServer) -> None:
    samples = await asyncio.to_thread(_samples, server.metrics.port)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset({"model": "m1", **labels}.items()))]

    assert value("infermesh_running_sequences") == 3
    assert value("infermesh_waiting_sequences") == 2
    assert value("infermesh_kv_cache_blocks", state="used") == 6
    assert value("infermesh_kv_cache_blocks", state="free") == 4
    assert value("infermesh_prefix_cache_hit_ratio") == 0.25
    assert value("infermesh_throughput_tokens_per_second", phase="decode") == 42.0
    assert value("infermesh_device_memory_bytes", device="cpu", state="used") == 250


async def test_metrics_port_zero_serves_nothing() -> None:
    srv = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE], register=_register)
    await srv.start()
    try:
        assert not srv.metrics.serving
    finally:
        await srv.stop(0)
