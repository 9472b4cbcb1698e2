"""Domain errors reach clients as precise statuses through a real grpc.aio server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.server import GrpcServer
from services.common.status import grpc_errors, unimplemented

SERVICE = "test.Errors"


class Handlers:
    @grpc_errors
    async def invalid(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("max_tokens", "must be <= 2048, got 99999")

    @grpc_errors
    async def exhausted(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ResourceExhausted("overloaded", retry_after_ms=250)

    @grpc_errors
    async def crash(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    @grpc_errors
    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"one"
        raise NotFound("session 'x' not found")

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    todo = unimplemented("Frobnicate")


def _register(server: grpc.aio.Server) -> None:
    h = Handlers()
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(h, name))
        for name in ("invalid", "exhausted", "crash", "echo", "todo")
    }
    handlers["stream"] = grpc.unary_stream_rpc_method_handler(h.stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    srv = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE], register=_register)
    await srv.start()
    async with grpc.aio.insecure_channel(srv.address) as ch:
        yield ch
    await srv.stop(0)


async def test_invalid_argument_names_the_field(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await channel.unary_unary(f"/{SERVICE}/invalid")(b"")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == "max_tokens: must be <= 2048, got 99999"


async def test_resource_exhausted_carries_pushback(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await channel.unary_unary(f"/{SERVICE}/exhausted")(b"")
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("grpc-retry-pushback-ms", "250") in tuple(exc.value.trailing_metadata())


async def test_unexpected_error_is_internal_and_server_keeps_serving(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await channel.unary_unary(f"/{SERVICE}/crash")(b"")
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in exc.value.details()  # internals stay in the log
    assert await channel.unary_unary(f"/{SERVICE}/echo")(b"still here") == b"still here"


async def test_streaming_error_after_first_message(channel: grpc.aio.Channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/stream")(b"")
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for item in call:
            got.append(item)
    assert got == [b"one"]
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unimplemented_says_so(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await channel.unary_unary(f"/{SERVICE}/todo")(b"")
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Frobnicate is not implemented yet" in exc.value.details()


async def test_health_follows_drain() -> None:
    srv = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE], register=_register)
    await srv.start()
    async with grpc.aio.insecure_channel(srv.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        await srv.set_serving(False)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await srv.stop(0)


async def test_serving_cannot_come_back_once_stopping() -> None:
    probe_said_serving = False

    async def drain() -> None:
        nonlocal probe_said_serving
        await srv.set_serving(True)  # what a health probe finishing now would do
        probe_said_serving = True
        async with grpc.aio.insecure_channel(srv.address) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING

    srv = GrpcServer(host="127.0.0.1", port=0, service_names=[SERVICE], register=_register, on_drain=drain)
    await srv.start()
    await srv.stop(1)
    assert probe_said_serving
