"""Request bytes that are no valid message: the field with bad UTF-8 named, else the message
type; through a real server, INVALID_ARGUMENT instead of grpc's UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from infermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.malformed import Undecodable, invalid_utf8_field, lenient
from services.common.server import GrpcServer


def with_bad_utf8(request: embedder_pb2.EmbedRequest, marker: str) -> bytes:
    """Serialise, then swap an ASCII marker (same length) for invalid UTF-8 bytes."""
    data = request.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"\xff" * len(marker))


@pytest.mark.parametrize(
    ("request_pb", "marker", "field"),
    [
        (embedder_pb2.EmbedRequest(inputs=["ok", "BAD!", "fine"]), "BAD!", "inputs[1]"),
        (embedder_pb2.EmbedRequest(inputs=["BAD!"]), "BAD!", "inputs[0]"),
        (embedder_pb2.EmbedRequest(model="BAD!", inputs=["x"], normalize=False), "BAD!", "model"),
        (embedder_pb2.EmbedRequest(request_id="BAD!", inputs=["x"]), "BAD!", "request_id"),
    ],
)
def test_lenient_deserializer_names_the_field_with_bad_utf8(
    request_pb: embedder_pb2.EmbedRequest, marker: str, field: str
) -> None:
    parsed = lenient(embedder_pb2.EmbedRequest.FromString)(with_bad_utf8(request_pb, marker))
    assert parsed == Undecodable("infermesh.embedder.v1.EmbedRequest", field)
    error = parsed.error()
    assert error.field == field
    assert "UTF-8" in error.message


def test_broken_wire_format_names_the_request() -> None:
    parsed = lenient(embedder_pb2.EmbedRequest.FromString)(b"\x1a\x05ab")  # length says 5, 2 bytes follow
    assert isinstance(parsed, Undecodable) and parsed.field is None
    assert parsed.error().message == "request: could not be parsed as infermesh.embedder.v1.EmbedRequest"


def test_valid_bytes_parse_normally() -> None:
    request = embedder_pb2.EmbedRequest(inputs=["héllo", "世界"])
    assert lenient(embedder_pb2.EmbedRequest.FromString)(request.SerializeToString()) == request
    assert invalid_utf8_field(embedder_pb2.EmbedRequest.DESCRIPTOR, request.SerializeToString()) is None


class _Info(embedder_pb2_grpc.EmbedderServicer):
    async def GetInfo(
        self, request: embedder_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.GetInfoResponse:
        return embedder_pb2.GetInfoResponse(endpoint_id="seen")

    async def StreamLoad(self, request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        raise AssertionError("a malformed request reached the servicer")
        yield  # pragma: no cover

    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        raise AssertionError("a malformed request reached the servicer")


async def test_a_server_answers_bad_bytes_invalid_argument_and_good_ones_normally() -> None:
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        service_names=["infermesh.embedder.v1.Embedder"],
        register=lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(_Info(), s),
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:

            def raw(method: str, kind: str = "unary_unary") -> grpc.aio.UnaryUnaryMultiCallable:
                return getattr(channel, kind)(
                    f"/infermesh.embedder.v1.Embedder/{method}",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )

            bad_utf8 = embedder_pb2.EmbedRequest(inputs=["ok", "BAD!"]).SerializeToString()
            bad_utf8 = bad_utf8.replace(b"BAD!", b"\xff" * 4)
            for method, kind, data, details in [
                ("Embed", "unary_unary", bad_utf8, "inputs[1]: is not valid UTF-8"),
                ("GetInfo", "unary_unary", b"\x0a\x05ab", "request: could not be parsed as"),
                ("StreamLoad", "unary_stream", b"\x08", "request: could not be parsed as"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    call = raw(method, kind)(data, timeout=5)
                    if kind == "unary_stream":
                        [m async for m in call]  # type: ignore[union-attr]
                    else:
                        await call
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, method
                assert (info.value.details() or "").startswith(details), info.value.details()
            reply = await raw("GetInfo")(b"", timeout=5)
            assert embedder_pb2.GetInfoResponse.FromString(reply).endpoint_id == "seen"
    finally:
        await server.stop(0)
