"""infermesh.worker.v1.Worker over grpc.aio: convert, call the service, convert back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.logs import request_id_var
from services.common.status import grpc_errors
from services.worker import convert
from services.worker.service import WorkerService

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
MIN_LOAD_INTERVAL_MS = 10


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, service: WorkerService) -> None:
        self.service = service
        # Set by the server once health exists: Drain turns health NOT_SERVING through it.

    @grpc_errors
    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        request_id_var.set(request.request_id)
        model = self.service.card.id
        async for delta in self.service.generate(convert.generate_request_from_pb(request)):
            yield convert.delta_to_pb(delta, model)
            # Only the first message names the model.
            model = ""

    @grpc_errors
    async def Tokenize(
        self, request: worker_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.TokenizeResponse:
        prompt = request.prompt if request.HasField("prompt") else None
        ids = await self.service.tokenize(request.model, convert.messages_from_pb(request.messages), prompt)
        return worker_pb2.TokenizeResponse(token_ids=ids, context_length=self.service.card.context_length)

    @grpc_errors
    async def StreamLoad(
        self, request: worker_pb2.StreamLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.LoadReport]:
        interval_ms = request.interval_ms or self.service.config.load_interval_ms
        if interval_ms < MIN_LOAD_INTERVAL_MS:
            raise InvalidArgument(
                "interval_ms", f"interval_ms={interval_ms}: must be 0 (default) or >= {MIN_LOAD_INTERVAL_MS}"
            )
        while True:
            yield convert.load_to_pb(self.service.load_report())
            if await self.service.wait_closing(interval_ms / 1000):
                return

    @grpc_errors
    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetInfoResponse:
        return convert.info_to_pb(self.service.endpoint_id, [self.service.card], self.service.device())

    @grpc_errors
    async def Drain(
        self, request: worker_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DrainResponse:
        logger.info("drain requested")
        await self.service.drain()
        return worker_pb2.DrainResponse()
