"""Protobuf at the edge: the only embedder module that builds or reads protobuf messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2
from services.common.convert import device_to_pb, model_info_to_pb
from services.common.device import DeviceStats
from services.common.errors import InvalidArgument
from services.common.model_card import ModelCard
from services.embedder.domain import EmbedQuery, EmbedResult, LoadSnapshot

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that did not parse. Handed to the handler so it answers INVALID_ARGUMENT:
    a parse error inside grpc itself would reach the client as a bare error with no field named."""

    message_type: str
    # The string field holding bad UTF-8, e.g. "inputs[2]", when that is what failed.
    field: str | None


def lenient(message_cls: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer that returns `Undecodable` instead of raising."""

    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return message_cls.FromString(data)
        except Exception:
            # DecodeError in practice; anything raised here would reach the client as UNKNOWN.
            descriptor = message_cls.DESCRIPTOR
            return Undecodable(descriptor.full_name, invalid_utf8_field(descriptor, data))

    return deserialize


def parsed(request: M | Undecodable) -> M:
    """The request, or InvalidArgument naming what could not be parsed."""
    if isinstance(request, Undecodable):
        if request.field is not None:
            raise InvalidArgument(request.field, "is not valid UTF-8; string fields must hold UTF-8 text")
        raise InvalidArgument("request", f"could not be parsed as {request.message_type}")
    return request


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


def embed_query_from_pb(request: embedder_pb2.EmbedRequest | Undecodable) -> EmbedQuery:
    message: embedder_pb2.EmbedRequest = parsed(request)
    return EmbedQuery(
        inputs=list(message.inputs),
        model=message.model,
        normalize=message.normalize if message.HasField("normalize") else True,
        truncate=message.truncate if message.HasField("truncate") else True,
        request_id=message.request_id,
    )


def embed_response_to_pb(result: EmbedResult) -> embedder_pb2.EmbedResponse:
    return embedder_pb2.EmbedResponse(
        model=result.model,
        embeddings=[
            embedder_pb2.Embedding(
                values=item.vector.tolist(), truncated=item.truncated, token_count=item.token_count
            )
            for item in result.items
        ],
        usage=common_pb2.Usage(prompt_tokens=result.prompt_tokens),
    )


def info_to_pb(endpoint_id: str, model: ModelCard, device: DeviceStats) -> embedder_pb2.GetInfoResponse:
    return embedder_pb2.GetInfoResponse(
        endpoint_id=endpoint_id, models=[model_info_to_pb(model)], device=device_to_pb(device)
    )


def load_report_to_pb(endpoint_id: str, load: LoadSnapshot) -> common_pb2.LoadReport:
    report = common_pb2.LoadReport(
        endpoint_id=endpoint_id,
        models=[model_info_to_pb(load.model)],
        device=device_to_pb(load.device),
        running=load.running,
        waiting=load.waiting,
        running_tokens=load.running_tokens,
        waiting_tokens=load.waiting_tokens,
        items_per_s=load.items_per_s,
        # The embedder has no prefix cache; this field carries its result cache's hit ratio.
        prefix_cache_hit_rate=load.cache_hit_rate,
        draining=load.draining,
    )
    report.at.GetCurrentTime()
    return report
