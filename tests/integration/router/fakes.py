"""In-process fakes of the worker, embedder and session services for router tests.

They implement the real protos honestly (streams, statuses, load reports) but compute
nothing: the worker echoes the last user message word by word, the embedder hashes, the
session store keeps everything in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from infermesh.session.v1 import session_pb2, session_pb2_grpc
from infermesh.worker.v1 import worker_pb2, worker_pb2_grpc
from services.common.server import GrpcServer

CHAT_MODEL = "fake-chat"
EMBED_MODEL = "fake-embed"
EMBED_DIM = 8


def chat_model(model_id: str = CHAT_MODEL, context_length: int = 512, tier: str = "") -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        id=model_id, kind=common_pb2.MODEL_KIND_CHAT, context_length=context_length, family="llama", tier=tier
    )


def embed_model() -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        id=EMBED_MODEL, kind=common_pb2.MODEL_KIND_EMBEDDING, context_length=128, embedding_dim=EMBED_DIM
    )


def words(text: str) -> list[str]:
    """The fake tokenizer: words with their trailing space."""
    return re.findall(r"\S+\s*", text)


def reply_for(req: worker_pb2.GenerateRequest, prefix: str = "echo: ") -> str:
    """What the fake worker answers: an echo of the last user message (or the prompt)."""
    if req.HasField("prompt"):
        return prefix + req.prompt
    users = [m.content for m in req.messages if m.role == common_pb2.ROLE_USER]
    return prefix + (users[-1] if users else "")


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class _ReportsLoad:
    """StreamLoad for both fakes: a report every interval, unless paused (a hung endpoint)."""

    reports_paused = False

    def load_report(self) -> common_pb2.LoadReport:
        raise NotImplementedError

    async def StreamLoad(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        while True:
            if not self.reports_paused:
                yield self.load_report()
            await asyncio.sleep((request.interval_ms or 100) / 1000)


class FakeWorker(_ReportsLoad, worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        endpoint_id: str = "fake-worker",
        models: list[common_pb2.ModelInfo] | None = None,
        token_delay_s: float = 0.0,
        running: int = 0,
        waiting: int = 0,
        decode_tokens_per_s: float = 42.0,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.models = models or [chat_model()]
        self.token_delay_s = token_delay_s
        # Reported load: these fixed numbers plus the streams in flight.
        self.running = running
        self.waiting = waiting
        self.decode_tokens_per_s = decode_tokens_per_s
        self.tokens_left: dict[int, int] = {}  # per stream in flight
        self.waiting_tokens = 0  # reported as queued work (drives the router's degradation ladder)
        self.draining = False
        self.reply_prefix = "echo: "
        self.fail_with: grpc.StatusCode | None = None
        # When set, the stream pauses after `hold_after` tokens until `release` is set.
        self.hold_after: int | None = None
        self.release = asyncio.Event()
        self.requests: list[worker_pb2.GenerateRequest] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    def request(self, request_id: str) -> worker_pb2.GenerateRequest:
        return next(r for r in self.requests if r.request_id == request_id)

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.requests.append(request)
        if self.fail_with is not None:
            await context.abort(self.fail_with, f"fake worker told to fail with {self.fail_with.name}")
        model = next((m for m in self.models if m.id == request.model), None)
        if model is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model: unknown model {request.model!r}")
        prompt_text = request.prompt + "".join(m.content + " " for m in request.messages)
        prompt_tokens = len(words(prompt_text))
        if prompt_tokens + request.max_tokens > model.context_length:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt: {prompt_tokens} tokens + max_tokens {request.max_tokens} exceed the context "
                f"length {model.context_length} of {model.id}",
            )
        tokens = words(reply_for(request, self.reply_prefix))[: request.max_tokens]
        reason = (
            common_pb2.FINISH_REASON_LENGTH
            if len(tokens) == request.max_tokens
            else common_pb2.FINISH_REASON_STOP
        )
        stream = id(context)
        # Like a real worker: resumed tokens were delivered already, generation goes on after them.
        resumed = len(request.resume_token_ids)
        try:
            for i, token in enumerate(tokens):
                if i < resumed:
                    continue
                self.tokens_left[stream] = len(tokens) - i
                if self.hold_after is not None and i == self.hold_after:
                    await self.release.wait()
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                last = i == len(tokens) - 1
                resp = worker_pb2.GenerateResponse(text=token, token_ids=[1000 + i], model=model.id)
                if last:
                    resp.finish_reason = reason
                    resp.usage.prompt_tokens = prompt_tokens
                    resp.usage.completion_tokens = len(tokens)
                yield resp
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.tokens_left.pop(stream, None)
        self.finished.append(request.request_id)

    def load_report(self) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(
            endpoint_id=self.endpoint_id,
            at=_now(),
            running=self.running + len(self.tokens_left),
            waiting=self.waiting,
            running_tokens=sum(self.tokens_left.values()),
            waiting_tokens=self.waiting_tokens,
            kv_blocks_free=90,
            kv_blocks_total=100,
            decode_tokens_per_s=self.decode_tokens_per_s,
            device=common_pb2.DeviceInfo(type=common_pb2.DEVICE_TYPE_CPU, name="fake cpu"),
            draining=self.draining,
        )

    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetInfoResponse:
        return worker_pb2.GetInfoResponse(endpoint_id=self.endpoint_id, models=self.models)

    async def Tokenize(
        self, request: worker_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.TokenizeResponse:
        text = request.prompt + "".join(m.content + " " for m in request.messages)
        return worker_pb2.TokenizeResponse(token_ids=range(len(words(text))), context_length=512)

    async def Drain(self, request: worker_pb2.DrainRequest, context: grpc.aio.ServicerContext) -> Any:
        self.draining = True
        return worker_pb2.DrainResponse()


class FakeEmbedder(_ReportsLoad, embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, endpoint_id: str = "fake-embedder") -> None:
        self.endpoint_id = endpoint_id
        self.requests: list[embedder_pb2.EmbedRequest] = []

    @staticmethod
    def vector(text: str) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        return [(b - 128) / 128 for b in digest[:EMBED_DIM]]

    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        self.requests.append(request)
        if request.model != EMBED_MODEL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model: unknown model {request.model!r}")
        out = embedder_pb2.EmbedResponse(model=EMBED_MODEL)
        for text in request.inputs:
            out.embeddings.add(values=self.vector(text), token_count=len(words(text)))
        out.usage.prompt_tokens = sum(e.token_count for e in out.embeddings)
        return out

    def load_report(self) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(endpoint_id=self.endpoint_id, at=_now(), items_per_s=100.0)

    async def GetInfo(
        self, request: embedder_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.GetInfoResponse:
        return embedder_pb2.GetInfoResponse(endpoint_id=self.endpoint_id, models=[embed_model()])


class FakeSessionStore(session_pb2_grpc.SessionStoreServicer):
    def __init__(self) -> None:
        self.sessions: dict[str, common_pb2.Session] = {}
        self.messages: dict[str, list[common_pb2.Message]] = {}
        self.append_calls: list[session_pb2.AppendMessagesRequest] = []
        self.window_calls: list[session_pb2.GetWindowRequest] = []
        # Seconds GetWindow and AppendMessages take before answering (a slow session service).
        self.window_delay_s = 0.0
        self.append_delay_s = 0.0
        self._ids = itertools.count(1)

    async def _session(self, tenant: str, session_id: str, context: grpc.aio.ServicerContext) -> Any:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} not found")
        return session

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Session:
        session_id = request.session_id or f"s{next(self._ids)}-{time.monotonic_ns()}"
        session = common_pb2.Session(
            session_id=session_id,
            tenant=request.tenant,
            user_id=request.user_id,
            model=request.model,
            metadata=request.metadata,
            created_at=_now(),
            retention_days=request.retention_days,
        )
        self.sessions[session_id] = session
        self.messages[session_id] = []
        return session

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Session:
        return await self._session(request.tenant, request.session_id, context)

    async def AppendMessages(
        self, request: session_pb2.AppendMessagesRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AppendMessagesResponse:
        self.append_calls.append(request)
        await asyncio.sleep(self.append_delay_s)
        session = await self._session(request.tenant, request.session_id, context)
        stored = self.messages[request.session_id]
        by_id = {m.client_msg_id: m for m in stored if m.client_msg_id}
        # Like the real store: a known client_msg_id is a retry, unless its content differs.
        for new in request.messages:
            known = by_id.get(new.client_msg_id)
            if known is not None and (known.role, known.content) != (new.role, new.content):
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"client_msg_id {new.client_msg_id!r} was already used for a different message",
                )
        retry = all(new.client_msg_id in by_id for new in request.messages)
        if (
            not retry
            and request.HasField("expected_last_seq")
            and request.expected_last_seq != session.last_seq
        ):
            await context.abort(grpc.StatusCode.ABORTED, f"last_seq is {session.last_seq}")
        out = []
        for new in request.messages:
            existing = by_id.get(new.client_msg_id)
            if existing is None:
                session.last_seq += 1
                existing = common_pb2.Message(
                    seq=session.last_seq,
                    role=new.role,
                    content=new.content,
                    client_msg_id=new.client_msg_id,
                    token_count=new.token_count or len(words(new.content)),
                    created_at=_now(),
                )
                stored.append(existing)
            out.append(existing)
        return session_pb2.AppendMessagesResponse(messages=out, last_seq=session.last_seq)

    async def GetHistory(
        self, request: session_pb2.GetHistoryRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetHistoryResponse:
        await self._session(request.tenant, request.session_id, context)
        after = [m for m in self.messages[request.session_id] if m.seq > request.after_seq]
        size = request.page_size or 100
        return session_pb2.GetHistoryResponse(messages=after[:size], has_more=len(after) > size)

    async def GetWindow(
        self, request: session_pb2.GetWindowRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetWindowResponse:
        self.window_calls.append(request)
        await asyncio.sleep(self.window_delay_s)
        session = await self._session(request.tenant, request.session_id, context)
        stored = self.messages[request.session_id]
        system = [m for m in stored if m.role == common_pb2.ROLE_SYSTEM][:1]
        budget = request.token_budget - sum(m.token_count for m in system)
        picked: list[common_pb2.Message] = []
        for m in reversed([m for m in stored if m not in system]):
            if request.token_budget and budget - m.token_count < 0:
                break
            budget -= m.token_count
            picked.insert(0, m)
        truncated = len(system) + len(picked) < len(stored)
        return session_pb2.GetWindowResponse(
            messages=[*system, *picked], last_seq=session.last_seq, truncated=truncated
        )

    async def DeleteSession(
        self, request: session_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.DeleteSessionResponse:
        await self._session(request.tenant, request.session_id, context)
        del self.sessions[request.session_id]
        del self.messages[request.session_id]
        return session_pb2.DeleteSessionResponse()

    async def ExportUserData(
        self, request: session_pb2.ExportUserDataRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.SessionExport]:
        for session in list(self.sessions.values()):
            if session.tenant == request.tenant and session.user_id == request.user_id:
                yield common_pb2.SessionExport(session=session, messages=self.messages[session.session_id])


_REGISTER: dict[type, tuple[Callable[[Any, grpc.aio.Server], None], str]] = {
    FakeWorker: (worker_pb2_grpc.add_WorkerServicer_to_server, "infermesh.worker.v1.Worker"),
    FakeEmbedder: (embedder_pb2_grpc.add_EmbedderServicer_to_server, "infermesh.embedder.v1.Embedder"),
    FakeSessionStore: (
        session_pb2_grpc.add_SessionStoreServicer_to_server,
        "infermesh.session.v1.SessionStore",
    ),
}


async def start_fake(servicer: Any, port: int = 0) -> GrpcServer:
    """Serve `servicer` on 127.0.0.1 (a free port unless given), with health, started."""
    add, name = _REGISTER[type(servicer)]
    server = GrpcServer(
        host="127.0.0.1", port=port, service_names=[name], register=lambda s: add(servicer, s)
    )
    await server.start()
    return server
