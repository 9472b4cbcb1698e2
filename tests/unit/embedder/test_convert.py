"""Protobuf conversion at the embedder's edge."""

from __future__ import annotations

import numpy as np

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2
from services.common.device import DeviceStats
from services.common.model_card import ModelCard
from services.embedder import convert
from services.embedder.domain import EmbeddedItem, EmbedResult, LoadSnapshot

MODEL = ModelCard("m", "embedding", 256, "bert", "small", "pkg", embedding_dim=3)
DEVICE = DeviceStats("cuda", "gpu", 1000, 100, "float16")


def test_query_defaults_normalize_and_truncate_to_true_when_unset() -> None:
    query = convert.embed_query_from_pb(embedder_pb2.EmbedRequest(inputs=["a"], request_id="r1"))
    assert (query.normalize, query.truncate, query.model, query.request_id) == (True, True, "", "r1")
    query = convert.embed_query_from_pb(
        embedder_pb2.EmbedRequest(inputs=["a"], normalize=False, truncate=False)
    )
    assert (query.normalize, query.truncate) == (False, False)


def test_response_carries_vectors_flags_and_usage() -> None:
    result = EmbedResult(
        model="m",
        items=[
            EmbeddedItem(np.array([0.5, -0.25], dtype=np.float32), truncated=True, token_count=256),
            EmbeddedItem(np.array([1.0, 0.0], dtype=np.float32), truncated=False, token_count=3),
        ],
    )
    pb = convert.embed_response_to_pb(result)
    assert [list(e.values) for e in pb.embeddings] == [[0.5, -0.25], [1.0, 0.0]]
    assert [(e.truncated, e.token_count) for e in pb.embeddings] == [(True, 256), (False, 3)]
    assert pb.usage.prompt_tokens == 259


def test_info_and_load_report() -> None:
    info = convert.info_to_pb("e1", MODEL, DEVICE)
    assert info.models[0].kind == common_pb2.MODEL_KIND_EMBEDDING
    assert (info.models[0].context_length, info.models[0].embedding_dim) == (256, 3)
    assert info.device.type == common_pb2.DEVICE_TYPE_CUDA
    load = LoadSnapshot(
        MODEL,
        DEVICE,
        running=2,
        waiting=3,
        running_tokens=20,
        waiting_tokens=30,
        items_per_s=12.5,
        draining=True,
    )
    report = convert.load_report_to_pb("e1", load)
    assert (report.endpoint_id, report.running, report.waiting, report.items_per_s) == ("e1", 2, 3, 12.5)
    assert (report.running_tokens, report.waiting_tokens, report.draining) == (20, 30, True)
    assert report.at.seconds > 0
