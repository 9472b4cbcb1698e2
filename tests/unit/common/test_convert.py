"""Converters for the common.v1 types that the worker, embedder and router all build."""

from __future__ import annotations

import pytest

from infermesh.common.v1 import common_pb2
from services.common import convert
from services.common.device import DeviceStats
from services.common.model_card import ModelCard


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("cpu", common_pb2.DEVICE_TYPE_CPU),
        ("cuda", common_pb2.DEVICE_TYPE_CUDA),
        ("mps", common_pb2.DEVICE_TYPE_MPS),
        ("xpu", common_pb2.DEVICE_TYPE_UNSPECIFIED),
        ("", common_pb2.DEVICE_TYPE_UNSPECIFIED),
    ],
)
def test_device_type_maps_and_unknown_is_unspecified(kind: str, expected: int) -> None:
    pb = convert.device_to_pb(DeviceStats(kind, "gpu", 1000, 100, "float16"))
    assert pb.type == expected
    assert (pb.name, pb.memory_total_bytes, pb.memory_used_bytes, pb.dtype) == ("gpu", 1000, 100, "float16")


def test_model_info_carries_kind_and_embedding_dim() -> None:
    chat = convert.model_info_to_pb(ModelCard("c", "chat", 2048, "llama", "small", "c.gguf"))
    assert (chat.id, chat.kind, chat.context_length, chat.embedding_dim) == (
        "c",
        common_pb2.MODEL_KIND_CHAT,
        2048,
        0,
    )
    assert (chat.family, chat.tier, chat.source) == ("llama", "small", "c.gguf")
    embed = convert.model_info_to_pb(
        ModelCard("e", "embedding", 256, "bert", "small", "pkg", embedding_dim=384)
    )
    assert (embed.kind, embed.embedding_dim) == (common_pb2.MODEL_KIND_EMBEDDING, 384)


def test_timestamp_round_trips_to_the_microsecond() -> None:
    ts = convert.timestamp_to_pb(1_700_000_000.25)
    assert (ts.seconds, ts.nanos) == (1_700_000_000, 250_000_000)
    assert convert.timestamp_seconds(ts) == pytest.approx(1_700_000_000.25, abs=1e-6)
