"""Thin gRPC servicers of the public API: Inference and Admin."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.errors import DomainError, FailedPrecondition, InvalidArgument
from services.common.logs import request_id_var
from services.common.status import grpc_errors
from services.router import convert
from services.router.auth import EMBED, GENERATE, authorize_model, current_principal
from services.router.batch_store import BatchStore, create_store_engine
from services.router.batches import BatchService
from services.router.call_guard import CallGuard
from services.router.config import RouterConfig
from services.router.core.domain import EndpointKind, GenerateCall, ModelKind
from services.router.core.queues import Priority
from services.router.core.registry import EndpointView
from services.router.core.validation import resolve_model, validate_embed
from services.router.endpoints import EndpointMonitor, Placement
from services.router.pipeline import NO_SESSION_SERVICE, Pipeline
from services.router.sessions import SessionClient
from services.router.tenancy import tenant_of

_SESSION_HEALTH_TIMEOUT_S = 1.0


class InferenceServicer(router_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        config: RouterConfig,
        endpoints: EndpointMonitor,
        sessions: SessionClient | None,
        router_id: str,
        call_guard: CallGuard,
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.sessions = sessions
        self.router_id = router_id
        self.guard = call_guard
        self.pipeline = Pipeline(config, endpoints, sessions, call_guard)
        store = BatchStore(create_store_engine(config.batch.store_url))
        self.batches = BatchService(config, store, self.pipeline, endpoints.registry.catalog, router_id)

    @grpc_errors
    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        principal = current_principal()
        call = GenerateCall(
            params=convert.generate_from_pb(request),
            tenant=tenant_of(context),
            key_prefix="" if principal is None else principal.key_prefix,
            method=GENERATE,
            time_remaining=context.time_remaining(),
        )
        async for chunk in self.pipeline.generate(call):
            yield convert.reply_chunk_to_pb(chunk)

    @grpc_errors
    async def Embed(
        self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.EmbedResponse:
        principal = current_principal()
        if not self.guard.active:
            return await self._embed(request, context)
        # Input size and the tenant's quota, as for Generate.
        return await self.guard.embed(
            request,
            tenant_of(context),
            "" if principal is None else principal.key_prefix,
            EMBED,
            lambda: self._embed(request, context),
        )

    async def _embed(
        self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.EmbedResponse:
        params = convert.embed_from_pb(request)
        request_id = params.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        model = validate_embed(
            params,
            self.endpoints.registry.catalog(),
            self.config.default_embedding_model,
            self.config.max_embed_inputs,
            self.config.max_request_id_chars,
        )
        authorize_model(model.id)
        outgoing = convert.embed_request_to_pb(request, request_id, model.id)
        timeout = _bounded(self.config.downstream_timeout_s, context.time_remaining())

        async def embed(placed: Placement) -> Any:
            return await self.endpoints.stub(placed.address).Embed(outgoing, timeout=timeout)

        resp = await self.endpoints.dispatch(
            EndpointKind.EMBEDDER, model.id, embed, self.config.dispatch_attempts
        )
        return convert.embed_response_from_pb(resp)

    # --- sessions: forwarded with the caller's tenant -------------------------------------

    def _sessions(self) -> SessionClient:
        if self.sessions is None:
            raise FailedPrecondition(NO_SESSION_SERVICE)
        return self.sessions

    async def _forward(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._sessions().unary(method, request, context.time_remaining())

    @grpc_errors
    async def CreateSession(
        self, request: router_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Session:
        return await self._forward(
            "CreateSession", convert.create_session_to_pb(request, tenant_of(context)), context
        )

    @grpc_errors
    async def GetSession(
        self, request: router_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Session:
        _require("session_id", request.session_id)
        return await self._forward(
            "GetSession", convert.get_session_to_pb(request, tenant_of(context)), context
        )

    @grpc_errors
    async def GetHistory(
        self, request: router_pb2.GetHistoryRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetHistoryResponse:
        _require("session_id", request.session_id)
        resp = await self._forward(
            "GetHistory", convert.get_history_to_pb(request, tenant_of(context)), context
        )
        return convert.get_history_from_pb(resp)

    @grpc_errors
    async def AppendMessages(
        self, request: router_pb2.AppendMessagesRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.AppendMessagesResponse:
        _require("session_id", request.session_id)
        if not request.messages:
            raise InvalidArgument("messages", "must not be empty")
        missing = convert.first_message_without_role(request)
        if missing is not None:
            raise InvalidArgument(f"messages[{missing}].role", "must be set")
        resp = await self._forward(
            "AppendMessages", convert.append_to_pb(request, tenant_of(context)), context
        )
        return convert.append_from_pb(resp)

    @grpc_errors
    async def DeleteSession(
        self, request: router_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DeleteSessionResponse:
        _require("session_id", request.session_id)
        await self._forward(
            "DeleteSession", convert.delete_session_to_pb(request, tenant_of(context)), context
        )
        return router_pb2.DeleteSessionResponse()

    @grpc_errors
    async def ExportUserData(
        self, request: router_pb2.ExportUserDataRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.SessionExport]:
        _require("user_id", request.user_id)
        outgoing = convert.export_to_pb(request, tenant_of(context))
        async for item in self._sessions().export(outgoing, context.time_remaining()):
            yield item

    # --- batch jobs: see batches.py -------------------------------------------------------

    @grpc_errors
    async def SubmitBatch(
        self, request: router_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.BatchJob:
        return await self.batches.submit(request, tenant_of(context))

    @grpc_errors
    async def GetBatch(
        self, request: router_pb2.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.BatchJob:
        return await self.batches.get(request.batch_id, tenant_of(context))

    @grpc_errors
    async def ListBatches(
        self, request: router_pb2.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListBatchesResponse:
        return await self.batches.list_jobs(request, tenant_of(context))

    @grpc_errors
    async def GetBatchResults(
        self, request: router_pb2.GetBatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.BatchResult]:
        async for result in self.batches.results(request.batch_id, tenant_of(context)):
            yield result

    @grpc_errors
    async def CancelBatch(
        self, request: router_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.BatchJob:
        return await self.batches.cancel(request.batch_id, tenant_of(context))

    # --- catalog and status ---------------------------------------------------------------

    @grpc_errors
    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        catalog = self.endpoints.registry.catalog()
        return convert.list_models_to_pb(
            catalog,
            _default(self.config.default_chat_model, catalog, ModelKind.CHAT),
            _default(self.config.default_embedding_model, catalog, ModelKind.EMBEDDING),
        )

    @grpc_errors
    async def GetClusterStatus(
        self, request: router_pb2.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ClusterStatus:
        views = self.endpoints.registry.views(self.endpoints.clock())
        if self.sessions is not None:
            healthy, detail = await self.sessions.health(_SESSION_HEALTH_TIMEOUT_S)
            views.append(
                EndpointView(self.sessions.address, EndpointKind.SESSION, healthy, detail, None, None, ())
            )
        status = convert.cluster_status_to_pb(self.router_id, views)
        queue = self.pipeline.admission.queue
        status.queues.extend(
            router_pb2.QueueDepth(priority=cast(common_pb2.Priority, int(p)), depth=queue.depth(p))
            for p in Priority
        )
        return status


def _require(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")


def _bounded(limit_s: float, remaining: float | None) -> float:
    return limit_s if remaining is None else min(limit_s, remaining)


def _default(configured: str, catalog: list[Any], kind: ModelKind) -> str:
    """The model a request without `model` gets, or "" while none is known."""
    try:
        return resolve_model("", configured, catalog, kind).id
    except DomainError:
        return configured
