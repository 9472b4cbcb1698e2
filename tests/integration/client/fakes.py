"""A stand-in Inference server that fails on command and records what callers sent, for
testing the client's retries, pushback and metadata."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.server import GrpcServer


class FlakyInference(router_pb2_grpc.InferenceServicer):
    """Answers the first `failures` calls with `code` (and a pushback trailer when set)."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.pushback_ms: int | None = None
        self.arrivals: list[float] = []  # loop time of each attempt
        self.metadata: list[dict[str, str]] = []

    def _arrive(self, context: grpc.aio.ServicerContext) -> bool:
        self.arrivals.append(asyncio.get_running_loop().time())
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        if self.failures <= 0:
            return False
        self.failures -= 1
        if self.pushback_ms is not None:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
        return True

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        if self._arrive(context):
            await context.abort(self.code, "told to fail")
        return router_pb2.ListModelsResponse(default_chat_model="flaky")

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        if self._arrive(context):
            await context.abort(self.code, "told to fail")
        yield router_pb2.GenerateResponse(text="ok", finish_reason=1)


async def start_flaky() -> tuple[FlakyInference, GrpcServer]:
    servicer = FlakyInference()
    name = router_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        service_names=[name],
        register=lambda s: router_pb2_grpc.add_InferenceServicer_to_server(servicer, s),
    )
    await server.start()
    return servicer, server
