"""One real worker (the packaged model, bfloat16) per test session, served on a free port."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator

import grpc
import pytest

from infermesh.worker.v1 import worker_pb2_grpc
from services.common.server import GrpcServer
from services.worker.config import WorkerConfig
from services.worker.server import build_server
from services.worker.service import WorkerService

# Everything comes from local files; a test must never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTEXT = 2048


@dataclasses.dataclass
class RunningWorker:
    config: WorkerConfig
    service: WorkerService
    server: GrpcServer
    stub: worker_pb2_grpc.WorkerStub
    channel: grpc.aio.Channel


@pytest.fixture(scope="session")
async def worker() -> AsyncIterator[RunningWorker]:
    # A shorter context than the model's 8192 keeps the context-limit tests' prefills quick.
    config = WorkerConfig(port=0, endpoint_id="worker-under-test", max_context=CONTEXT)
    service = await WorkerService.load(config)
    server = build_server(config, service)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield RunningWorker(config, service, server, worker_pb2_grpc.WorkerStub(channel), channel)
    await server.stop(1.0)
