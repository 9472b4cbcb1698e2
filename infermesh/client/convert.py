"""Protobuf at the client's edge: requests built from plain values, results read into the
dataclasses of `types`. Shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from infermesh.client import types as t
from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2

_ROLE_TO_PB = {
    t.Role.SYSTEM: common_pb2.ROLE_SYSTEM,
    t.Role.USER: common_pb2.ROLE_USER,
    t.Role.ASSISTANT: common_pb2.ROLE_ASSISTANT,
    t.Role.TOOL: common_pb2.ROLE_TOOL,
}
_ROLE_FROM_PB: dict[int, t.Role] = {v: k for k, v in _ROLE_TO_PB.items()}
_PRIORITY_TO_PB = {
    t.Priority.CRITICAL: common_pb2.PRIORITY_CRITICAL,
    t.Priority.INTERACTIVE: common_pb2.PRIORITY_INTERACTIVE,
    t.Priority.STANDARD: common_pb2.PRIORITY_STANDARD,
    t.Priority.BATCH: common_pb2.PRIORITY_BATCH,
}
_FINISH_FROM_PB: dict[int, t.FinishReason] = {
    common_pb2.FINISH_REASON_STOP: t.FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: t.FinishReason.LENGTH,
    common_pb2.FINISH_REASON_CANCELLED: t.FinishReason.CANCELLED,
    common_pb2.FINISH_REASON_DEADLINE: t.FinishReason.DEADLINE,
    common_pb2.FINISH_REASON_ERROR: t.FinishReason.ERROR,
}
_BATCH_STATE_FROM_PB: dict[int, t.BatchState] = {
    router_pb2.BATCH_STATE_QUEUED: t.BatchState.QUEUED,
    router_pb2.BATCH_STATE_RUNNING: t.BatchState.RUNNING,
    router_pb2.BATCH_STATE_SUCCEEDED: t.BatchState.SUCCEEDED,
    router_pb2.BATCH_STATE_FAILED: t.BatchState.FAILED,
    router_pb2.BATCH_STATE_CANCELLED: t.BatchState.CANCELLED,
}


def _enum_suffix(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _time(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


# --- requests ------------------------------------------------------------------------------


def message_to_pb(message: t.MessageLike) -> common_pb2.ChatMessage:
    if isinstance(message, str):
        return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=message)
    if isinstance(message, t.Message):
        role, content = message.role, message.content
    else:
        role, content = message.get("role", ""), message.get("content", "")
    try:
        pb_role = _ROLE_TO_PB[t.Role(str(role).lower())]
    except ValueError:
        raise ValueError(f"role {role!r}: must be one of {', '.join(r.value for r in t.Role)}") from None
    return common_pb2.ChatMessage(role=pb_role, content=content)


def generate_request(
    messages: Sequence[t.MessageLike] | str | None = None,
    *,
    prompt: str | None = None,
    model: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    priority: t.Priority | str | None = None,
    session_id: str | None = None,
    request_id: str = "",
    allow_fallback: bool = False,
    deadline: datetime | None = None,
) -> router_pb2.GenerateRequest:
    if isinstance(messages, str):
        messages = [messages]
    sampling = common_pb2.SamplingParams()
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    req = router_pb2.GenerateRequest(
        model=model,
        messages=[message_to_pb(m) for m in messages or ()],
        sampling=sampling,
        stop=list(stop),
        request_id=request_id,
        allow_fallback=allow_fallback,
    )
    if prompt is not None:
        req.prompt = prompt
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if session_id is not None:
        req.session_id = session_id
    if priority is not None:
        req.priority = _PRIORITY_TO_PB[t.Priority(priority)]
    if deadline is not None:
        req.deadline.FromDatetime(deadline)
    return req


def batch_request(items: Iterable[t.BatchItem], display_name: str) -> router_pb2.SubmitBatchRequest:
    out = router_pb2.SubmitBatchRequest(display_name=display_name)
    for item in items:
        req = generate_request(
            item.messages,
            prompt=item.prompt,
            model=item.model,
            max_tokens=item.max_tokens,
            temperature=item.temperature,
            top_p=item.top_p,
            top_k=item.top_k,
            seed=item.seed,
            stop=item.stop,
        )
        out.items.append(router_pb2.BatchItem(custom_id=item.custom_id, request=req))
    return out


def embed_request(
    texts: Sequence[str], model: str, normalize: bool | None, truncate: bool | None, request_id: str
) -> router_pb2.EmbedRequest:
    req = router_pb2.EmbedRequest(model=model, inputs=list(texts), request_id=request_id)
    if normalize is not None:
        req.normalize = normalize
    if truncate is not None:
        req.truncate = truncate
    return req


def create_session_request(
    user_id: str, model: str, metadata: Mapping[str, str] | None, retention_days: int
) -> router_pb2.CreateSessionRequest:
    return router_pb2.CreateSessionRequest(
        user_id=user_id, model=model, metadata=dict(metadata or {}), retention_days=retention_days
    )


# --- results -------------------------------------------------------------------------------


def usage_from_pb(u: common_pb2.Usage) -> t.Usage:
    return t.Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


def finish_from_pb(value: int) -> t.FinishReason | None:
    return _FINISH_FROM_PB.get(value)


def chunk_from_pb(r: router_pb2.GenerateResponse) -> t.Chunk:
    return t.Chunk(
        text=r.text,
        token_ids=tuple(r.token_ids),
        finish_reason=finish_from_pb(r.finish_reason),
        usage=usage_from_pb(r.usage) if r.HasField("usage") else None,
        request_id=r.request_id,
        model=r.model,
        worker=r.worker,
        session_id=r.session_id,
        degraded=tuple(
            t.Degradation(
                _enum_suffix(common_pb2.DegradationStep.Name(d.step), "DEGRADATION_STEP_"), d.reason
            )
            for d in r.degraded
        ),
    )


class CompletionBuilder:
    """Folds the streamed chunks of one reply into a Completion."""

    def __init__(self) -> None:
        self.chunks: list[t.Chunk] = []

    def add(self, chunk: t.Chunk) -> t.Chunk:
        self.chunks.append(chunk)
        return chunk

    def build(self) -> t.Completion:
        first = self.chunks[0] if self.chunks else t.Chunk("")
        last = self.chunks[-1] if self.chunks else t.Chunk("")
        return t.Completion(
            text="".join(c.text for c in self.chunks),
            finish_reason=last.finish_reason or t.FinishReason.UNSPECIFIED,
            usage=last.usage or t.Usage(),
            request_id=first.request_id,
            model=first.model,
            worker=first.worker,
            session_id=first.session_id,
            degraded=tuple(d for c in self.chunks for d in c.degraded),
            token_ids=tuple(i for c in self.chunks for i in c.token_ids),
        )


def embeddings_from_pb(r: router_pb2.EmbedResponse) -> t.Embeddings:
    return t.Embeddings(
        model=r.model,
        embeddings=tuple(t.Embedding(tuple(e.values), e.truncated, e.token_count) for e in r.embeddings),
        usage=usage_from_pb(r.usage),
    )


def session_from_pb(s: common_pb2.Session) -> t.Session:
    return t.Session(
        session_id=s.session_id,
        user_id=s.user_id,
        model=s.model,
        last_seq=s.last_seq,
        created_at=_time(s.created_at, s.HasField("created_at")),
        updated_at=_time(s.updated_at, s.HasField("updated_at")),
        metadata=dict(s.metadata),
        retention_days=s.retention_days,
    )


def history_from_pb(r: router_pb2.GetHistoryResponse) -> list[t.HistoryMessage]:
    return [
        t.HistoryMessage(
            m.seq,
            _ROLE_FROM_PB.get(m.role, ""),
            m.content,
            m.token_count,
            _time(m.created_at, m.HasField("created_at")),
        )
        for m in r.messages
    ]


def models_from_pb(r: router_pb2.ListModelsResponse) -> t.Models:
    return t.Models(
        models=tuple(
            t.ModelInfo(
                m.id,
                _enum_suffix(common_pb2.ModelKind.Name(m.kind), "MODEL_KIND_"),
                m.context_length,
                m.embedding_dim,
                m.family,
                m.tier,
            )
            for m in r.models
        ),
        default_chat_model=r.default_chat_model,
        default_embedding_model=r.default_embedding_model,
    )


def cluster_from_pb(r: router_pb2.ClusterStatus) -> t.ClusterStatus:
    return t.ClusterStatus(
        router_id=r.router_id,
        endpoints=tuple(
            t.EndpointStatus(
                e.address,
                _enum_suffix(router_pb2.EndpointKind.Name(e.kind), "ENDPOINT_KIND_"),
                e.healthy,
                e.detail,
                e.HasField("load"),
                e.load.running,
                e.load.waiting,
                e.load.kv_blocks_free,
                e.load.kv_blocks_total,
                e.load.decode_tokens_per_s or e.load.items_per_s,
                e.report_age_ms,
            )
            for e in r.endpoints
        ),
        queue_depths={
            _enum_suffix(common_pb2.Priority.Name(q.priority), "PRIORITY_"): q.depth for q in r.queues
        },
    )


def batch_from_pb(j: router_pb2.BatchJob) -> t.BatchJob:
    return t.BatchJob(
        batch_id=j.batch_id,
        display_name=j.display_name,
        state=_BATCH_STATE_FROM_PB.get(j.state, t.BatchState.UNSPECIFIED),
        total=j.total,
        completed=j.completed,
        failed=j.failed,
        created_at=_time(j.created_at, j.HasField("created_at")),
        finished_at=_time(j.finished_at, j.HasField("finished_at")),
    )


def batch_result_from_pb(r: router_pb2.BatchResult) -> t.BatchResult:
    return t.BatchResult(
        custom_id=r.custom_id,
        index=r.index,
        text=r.text,
        finish_reason=finish_from_pb(r.finish_reason) or t.FinishReason.UNSPECIFIED,
        usage=usage_from_pb(r.usage),
        error_code=r.error_code,
        error_message=r.error_message,
    )
