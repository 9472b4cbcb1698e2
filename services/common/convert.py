"""Protobuf for the shared `infermesh.common.v1` types that more than one service builds."""

from __future__ import annotations

import math
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from infermesh.common.v1 import common_pb2
from services.common.model_card import ModelCard

_DEVICE_TYPES = {
    "cpu": common_pb2.DEVICE_TYPE_CPU,
    "cuda": common_pb2.DEVICE_TYPE_CUDA,
    "mps": common_pb2.DEVICE_TYPE_MPS,
}
_MODEL_KINDS = {"chat": common_pb2.MODEL_KIND_CHAT, "embedding": common_pb2.MODEL_KIND_EMBEDDING}


class Device(Protocol):
    """What DeviceInfo carries: a `DeviceStats` where the model runs, the router's copy of one."""

    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def memory_total_bytes(self) -> int: ...
    @property
    def memory_used_bytes(self) -> int: ...
    @property
    def dtype(self) -> str: ...


def device_to_pb(d: Device) -> common_pb2.DeviceInfo:
    return common_pb2.DeviceInfo(
        # A device type the proto does not know yet is UNSPECIFIED rather than an error.
        type=_DEVICE_TYPES.get(d.type, common_pb2.DEVICE_TYPE_UNSPECIFIED),
        name=d.name,
        memory_total_bytes=d.memory_total_bytes,
        memory_used_bytes=d.memory_used_bytes,
        dtype=d.dtype,
    )


def model_info_to_pb(card: ModelCard) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        id=card.id,
        kind=_MODEL_KINDS[card.kind],
        context_length=card.context_length,
        embedding_dim=card.embedding_dim,
        family=card.family,
        tier=card.tier,
        source=card.source,
    )


def timestamp_to_pb(seconds: float) -> Timestamp:
    # Whole and fractional seconds apart: seconds * 1e9 as a float is off by up to 256 ns.
    whole = math.floor(seconds)
    return Timestamp(seconds=whole, nanos=min(round((seconds - whole) * 1e9), 999_999_999))


def timestamp_seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9
