"""Request bytes that are no valid message get INVALID_ARGUMENT naming what is wrong (the
string field that is not UTF-8, else the message type) instead of the bare UNKNOWN grpc
answers when a deserializer raises. One interceptor, on every service's server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.errors import InvalidArgument
from services.common.metrics import HandlerInterceptor, checked_first


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that did not parse, handed on so the call can say so."""

    message_type: str
    # The string field holding bad UTF-8, e.g. "inputs[2]", when that is what failed.
    field: str | None

    def error(self) -> InvalidArgument:
        if self.field is not None:
            return InvalidArgument(self.field, "is not valid UTF-8; string fields must hold UTF-8 text")
        return InvalidArgument("request", f"could not be parsed as {self.message_type}")


def lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize` (a message class's FromString), returning `Undecodable` instead of raising."""
    message_cls = getattr(deserialize, "__self__", None)
    descriptor: Descriptor | None = getattr(message_cls, "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            # DecodeError in practice; anything raised here would reach the client as UNKNOWN.
            if descriptor is None:
                return Undecodable("the request message", None)
            return Undecodable(descriptor.full_name, invalid_utf8_field(descriptor, data))

    return parse


class MalformedRequests(HandlerInterceptor):
    """Parses each unary request leniently and answers an `Undecodable` one INVALID_ARGUMENT
    before any other part of the service sees it."""

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        return checked_first(handler, _refuse_undecodable, lenient(handler.request_deserializer))


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error().message)


def invalid_utf8_field(descriptor: Descriptor, data: bytes) -> str | None:
    """Walk the top-level wire format and name the first string field that is not UTF-8."""
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None or field.type != FieldDescriptor.TYPE_STRING:
                    continue
                index = seen.get(number, 0)
                seen[number] = index + 1
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{field.name}[{index}]" if field.is_repeated else field.name
            else:
                return None
    except IndexError:
        return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
