"""The `infermesh.embedder.v1.Embedder` gRPC servicer: protobuf in, engine call, protobuf out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.logs import request_id_var
from services.common.status import grpc_errors
from services.embedder import convert
from services.embedder.engine import EmbedEngine

logger = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
MIN_INTERVAL_MS = 10
MAX_INTERVAL_MS = 60_000


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, engine: EmbedEngine, *, endpoint_id: str, default_interval_ms: int) -> None:
        self.engine = engine
        # Set once the server is bound when it derives from the port.
        self.endpoint_id = endpoint_id
        self.default_interval_ms = default_interval_ms

    @grpc_errors
    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        query = convert.embed_query_from_pb(request)
        request_id_var.set(query.request_id)
        result = await self.engine.embed(query)
        return convert.embed_response_to_pb(result)

    @grpc_errors
    async def GetInfo(
        self, request: embedder_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.GetInfoResponse:
        return convert.info_to_pb(self.endpoint_id, self.engine.description, self.engine.model.device())

    @grpc_errors
    async def StreamLoad(
        self, request: embedder_pb2.StreamLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.LoadReport]:
        interval_ms = request.interval_ms or self.default_interval_ms
        if not MIN_INTERVAL_MS <= interval_ms <= MAX_INTERVAL_MS:
            raise InvalidArgument(
                "interval_ms",
                f"{interval_ms} is outside [{MIN_INTERVAL_MS}, {MAX_INTERVAL_MS}] "
                f"(0 means the server's default, {self.default_interval_ms})",
            )
        while True:
            yield convert.load_report_to_pb(self.endpoint_id, self.engine.load())
            if self.engine.draining:
                # The last report said draining; ending the stream lets shutdown finish.
                return
            await self.engine.wait_draining(interval_ms / 1000)
