"""Embed, ListModels, GetClusterStatus, health and the RPCs not built yet."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from tests.integration.router.conftest import Mesh
from tests.integration.router.fakes import CHAT_MODEL, EMBED_DIM, EMBED_MODEL, FakeEmbedder
from tests.integration.router.helpers import free_port, start_router


async def test_embed_is_forwarded_to_an_embedder(mesh: Mesh) -> None:
    req = router_pb2.EmbedRequest(inputs=["alpha", "beta gamma"], normalize=False, request_id="emb-1")
    resp = await mesh.stub.Embed(req, timeout=5)
    assert resp.model == EMBED_MODEL
    assert [list(e.values) for e in resp.embeddings] == [
        pytest.approx(FakeEmbedder.vector("alpha")),
        pytest.approx(FakeEmbedder.vector("beta gamma")),
    ]
    assert [e.token_count for e in resp.embeddings] == [1, 2]
    assert resp.usage.prompt_tokens == 3
    sent = mesh.embedder.requests[-1]
    assert sent.request_id == "emb-1" and sent.model == EMBED_MODEL
    assert sent.HasField("normalize") and not sent.normalize
    assert not sent.HasField("truncate")


async def test_list_models_comes_from_the_reports(mesh: Mesh) -> None:
    resp = await mesh.stub.ListModels(router_pb2.ListModelsRequest(), timeout=5)
    assert [(m.id, m.kind) for m in resp.models] == [
        (CHAT_MODEL, common_pb2.MODEL_KIND_CHAT),
        (EMBED_MODEL, common_pb2.MODEL_KIND_EMBEDDING),
    ]
    assert resp.models[0].context_length == 512
    assert resp.models[1].embedding_dim == EMBED_DIM
    assert (resp.default_chat_model, resp.default_embedding_model) == (CHAT_MODEL, EMBED_MODEL)


async def test_cluster_status_lists_every_endpoint(mesh: Mesh) -> None:
    status = await mesh.stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    assert status.router_id.startswith("router-")
    by_address = {e.address: e for e in status.endpoints}
    expected = {
        **{s.address: router_pb2.ENDPOINT_KIND_WORKER for s in mesh.worker_servers},
        mesh.embedder_server.address: router_pb2.ENDPOINT_KIND_EMBEDDER,
        mesh.session_server.address: router_pb2.ENDPOINT_KIND_SESSION,
    }
    assert {a: e.kind for a, e in by_address.items()} == expected
    assert all(e.healthy and e.detail == "ok" for e in status.endpoints)
    worker = by_address[mesh.worker_servers[0].address]
    assert worker.load.endpoint_id == "w0"
    assert worker.load.kv_blocks_total == 100
    assert worker.load.device.type == common_pb2.DEVICE_TYPE_CPU
    assert worker.load.HasField("at")
    assert 0 < worker.report_age_ms < 500
    assert by_address[mesh.embedder_server.address].load.items_per_s == 100.0
    assert not by_address[mesh.session_server.address].HasField("load")


async def test_router_serves_before_any_worker_is_known() -> None:
    router = await start_router(worker_addresses=[f"127.0.0.1:{free_port()}"])
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "infermesh.router.v1.Inference", "infermesh.router.v1.Admin"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            models = await router_pb2_grpc.InferenceStub(channel).ListModels(router_pb2.ListModelsRequest())
            assert not models.models and models.default_chat_model == ""
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await router_pb2_grpc.InferenceStub(channel).Embed(router_pb2.EmbedRequest(inputs=["x"]))
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "no embedder has reported" in (err.value.details() or "")
    finally:
        await router.stop(0)
