"""A real embedder server on port 0 and an in-process reference model, each loaded once per session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import pytest
from sentence_transformers import SentenceTransformer

from infermesh.embedder.v1 import embedder_pb2_grpc
from services.common.server import GrpcServer
from services.embedder.model import packaged_model_path
from services.embedder.server import create_server
from tests.integration.embedder.helpers import embedder_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(packaged_model_path()), device="cpu", local_files_only=True)


@pytest.fixture(scope="session")
async def embedder() -> AsyncIterator[GrpcServer]:
    # No result cache: a repeated text must go through the batcher and the model again.
    server = await create_server(embedder_config(endpoint_id="embedder-under-test", cache_entries=0))
    await server.start()
    yield server
    await server.stop(1.0)


@pytest.fixture(scope="session")
async def channel(embedder: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(embedder.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> embedder_pb2_grpc.EmbedderStub:
    return embedder_pb2_grpc.EmbedderStub(channel)
