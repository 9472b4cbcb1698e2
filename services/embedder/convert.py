"""Protobuf at the edge: the only embedder module that builds or reads protobuf messages."""

from __future__ import annotations

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2
from services.common.convert import device_to_pb, model_info_to_pb
from services.common.device import DeviceStats
from services.common.model_card import ModelCard
from services.embedder.domain import EmbedQuery, EmbedResult, LoadSnapshot


def embed_query_from_pb(message: embedder_pb2.EmbedRequest) -> EmbedQuery:
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
