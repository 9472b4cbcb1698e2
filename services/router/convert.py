"""Protobuf at the router's edge: from_pb/to_pb for its own API and for the calls it makes
to workers, embedders and the session service. No other router module builds or reads
message fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2
from infermesh.router.v1 import router_pb2
from infermesh.session.v1 import session_pb2
from infermesh.worker.v1 import worker_pb2
from services.common.convert import device_to_pb, timestamp_seconds, timestamp_to_pb
from services.router.core.domain import (
    ChatRole,
    ChatTurn,
    Degradation,
    Delta,
    DeviceSpec,
    EmbedParams,
    EndpointKind,
    FinishReason,
    GenerateParams,
    HistoryMessage,
    LoadSnapshot,
    ModelKind,
    ModelSpec,
    NewTurn,
    ReplyChunk,
    Sampling,
    Usage,
    WorkerRequest,
)
from services.router.core.registry import EndpointView

_ROLE_FROM_PB = {
    common_pb2.ROLE_SYSTEM: ChatRole.SYSTEM,
    common_pb2.ROLE_USER: ChatRole.USER,
    common_pb2.ROLE_ASSISTANT: ChatRole.ASSISTANT,
    common_pb2.ROLE_TOOL: ChatRole.TOOL,
}
_ROLE_TO_PB = {role: value for value, role in _ROLE_FROM_PB.items()}
_MODEL_KIND_FROM_PB = {
    common_pb2.MODEL_KIND_CHAT: ModelKind.CHAT,
    common_pb2.MODEL_KIND_EMBEDDING: ModelKind.EMBEDDING,
}
_MODEL_KIND_TO_PB = {kind: value for value, kind in _MODEL_KIND_FROM_PB.items()}
_ENDPOINT_KIND_TO_PB = {
    EndpointKind.WORKER: router_pb2.ENDPOINT_KIND_WORKER,
    EndpointKind.EMBEDDER: router_pb2.ENDPOINT_KIND_EMBEDDER,
    EndpointKind.SESSION: router_pb2.ENDPOINT_KIND_SESSION,
}
_DEVICE_PREFIX = "DEVICE_TYPE_"


# --- models and load ---------------------------------------------------------------------


def _same_named(source: object, cls: type, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The scalar fields a plain dataclass shares by name with a message (or the reverse)."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.name not in skip}


_MODEL_OWN = frozenset({"kind", "device_type"})
_DEVICE_OWN = frozenset({"type"})
_LOAD_OWN = frozenset({"at", "models", "device"})


def model_from_pb(m: common_pb2.ModelInfo) -> ModelSpec:
    kind = _MODEL_KIND_FROM_PB.get(m.kind, ModelKind.UNSPECIFIED)
    device = _device_type_from_pb(m.device_type)
    return ModelSpec(**_same_named(m, ModelSpec, _MODEL_OWN), kind=kind, device_type=device)


def model_to_pb(m: ModelSpec) -> common_pb2.ModelInfo:
    kind = _MODEL_KIND_TO_PB.get(m.kind, common_pb2.MODEL_KIND_UNSPECIFIED)
    out = common_pb2.ModelInfo(**_same_named(m, ModelSpec, _MODEL_OWN), kind=kind)
    if m.device_type:
        out.device_type = common_pb2.DeviceType.Value(_DEVICE_PREFIX + m.device_type.upper())
    return out


def _device_type_from_pb(value: int) -> str:
    """The device type's short name ("cpu", "cuda"...); "" for unspecified or unknown values."""
    if not value or value not in common_pb2.DeviceType.values():
        return ""
    return common_pb2.DeviceType.Name(value).removeprefix(_DEVICE_PREFIX).lower()


def models_from_pb(models: Sequence[common_pb2.ModelInfo]) -> tuple[ModelSpec, ...]:
    return tuple(model_from_pb(m) for m in models)


def _device_from_pb(d: common_pb2.DeviceInfo) -> DeviceSpec:
    return DeviceSpec(**_same_named(d, DeviceSpec, _DEVICE_OWN), type=_device_type_from_pb(d.type))


def load_from_pb(r: common_pb2.LoadReport) -> LoadSnapshot:
    return LoadSnapshot(
        **_same_named(r, LoadSnapshot, _LOAD_OWN),
        at=timestamp_seconds(r.at) if r.HasField("at") else 0.0,
        models=models_from_pb(r.models),
        device=_device_from_pb(r.device),
    )


def load_to_pb(s: LoadSnapshot) -> common_pb2.LoadReport:
    return common_pb2.LoadReport(
        **_same_named(s, LoadSnapshot, _LOAD_OWN),
        at=timestamp_to_pb(s.at) if s.at else None,
        models=[model_to_pb(m) for m in s.models],
        device=device_to_pb(s.device),
    )


# --- Generate ----------------------------------------------------------------------------


def generate_from_pb(req: router_pb2.GenerateRequest) -> GenerateParams:
    return GenerateParams(
        model=req.model,
        messages=tuple(ChatTurn(_ROLE_FROM_PB.get(m.role), m.content) for m in req.messages),
        prompt=req.prompt if req.HasField("prompt") else None,
        session_id=req.session_id if req.HasField("session_id") else None,
        sampling=sampling_from_pb(req.sampling),
        max_tokens=req.max_tokens if req.HasField("max_tokens") else None,
        stop=tuple(req.stop),
        priority=req.priority,
        deadline=timestamp_seconds(req.deadline) if req.HasField("deadline") else None,
        request_id=req.request_id,
        stop_token_ids=tuple(req.stop_token_ids),
        allow_fallback=req.allow_fallback,
    )


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    return Sampling(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        min_p=s.min_p if s.HasField("min_p") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )


def sampling_to_pb(s: Sampling) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams(ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        value = getattr(s, name)
        if value is not None:
            setattr(out, name, value)
    return out


def chat_to_pb(turns: Sequence[ChatTurn]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=_ROLE_TO_PB[t.role], content=t.content) for t in turns if t.role]


def worker_request_to_pb(
    request: WorkerRequest, resume_token_ids: Sequence[int] = ()
) -> worker_pb2.GenerateRequest:
    """The worker's request, continued after `resume_token_ids` when a stream moves."""
    out = worker_pb2.GenerateRequest(
        request_id=request.request_id,
        model=request.model,
        max_tokens=request.max_tokens,
        sampling=sampling_to_pb(request.sampling),
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        priority=cast(common_pb2.Priority, request.priority),
        resume_token_ids=resume_token_ids,
    )
    if request.prompt is not None:
        out.prompt = request.prompt
    else:
        out.messages.extend(chat_to_pb(request.messages))
    return out


_FINISH_FROM_PB = {
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    common_pb2.FINISH_REASON_DEADLINE: FinishReason.DEADLINE,
    common_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_FINISH_TO_PB = {reason: value for value, reason in _FINISH_FROM_PB.items()}


def finish_to_pb(finish: FinishReason | None) -> common_pb2.FinishReason:
    return common_pb2.FINISH_REASON_UNSPECIFIED if finish is None else _FINISH_TO_PB[finish]


def delta_from_pb(resp: worker_pb2.GenerateResponse) -> Delta:
    """A worker's message; a finish reason this router does not know reads as ERROR."""
    finish = None
    if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
        finish = _FINISH_FROM_PB.get(resp.finish_reason, FinishReason.ERROR)
    usage = None
    if resp.HasField("usage"):
        u = resp.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    return Delta(
        text=resp.text,
        token_ids=tuple(resp.token_ids),
        logprobs=tuple(resp.logprobs),
        finish=finish,
        usage=usage,
        model=resp.model,
    )


def degradation_to_pb(d: Degradation) -> common_pb2.Degradation:
    step = common_pb2.DegradationStep.Value(f"DEGRADATION_STEP_{d.step.name}")
    return common_pb2.Degradation(step=step, reason=d.reason)


def reply_chunk_to_pb(chunk: ReplyChunk) -> router_pb2.GenerateResponse:
    # Once per token: a middle message carries its text and ids only, so only those are set
    # (every keyword given to a protobuf constructor costs, empty or not).
    out = router_pb2.GenerateResponse(request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids)
    if chunk.logprobs:
        out.logprobs.extend(chunk.logprobs)
    if chunk.finish is not None:
        out.finish_reason = finish_to_pb(chunk.finish)
    if chunk.model:
        out.model = chunk.model
    if chunk.degraded:
        out.degraded.extend(degradation_to_pb(d) for d in chunk.degraded)
    if chunk.session_id:
        out.session_id = chunk.session_id
    if chunk.worker:
        out.worker = chunk.worker
    if chunk.usage is not None:
        out.usage.CopyFrom(usage_to_pb(chunk.usage))
    return out


def usage_to_pb(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


# --- sessions ----------------------------------------------------------------------------


def window_request(tenant: str, session_id: str, token_budget: int) -> session_pb2.GetWindowRequest:
    return session_pb2.GetWindowRequest(tenant=tenant, session_id=session_id, token_budget=token_budget)


def window_from_pb(resp: session_pb2.GetWindowResponse) -> list[HistoryMessage]:
    return [
        HistoryMessage(_ROLE_FROM_PB.get(m.role), m.content, m.client_msg_id, m.token_count)
        for m in resp.messages
    ]


def append_turns_request(
    tenant: str, session_id: str, turns: Sequence[NewTurn]
) -> session_pb2.AppendMessagesRequest:
    return session_pb2.AppendMessagesRequest(
        tenant=tenant,
        session_id=session_id,
        messages=[
            common_pb2.NewMessage(
                role=_ROLE_TO_PB[t.role],
                content=t.content,
                client_msg_id=t.client_msg_id,
                token_count=t.token_count,
            )
            for t in turns
        ],
    )


def create_session_to_pb(
    req: router_pb2.CreateSessionRequest, tenant: str
) -> session_pb2.CreateSessionRequest:
    return session_pb2.CreateSessionRequest(
        tenant=tenant,
        user_id=req.user_id,
        model=req.model,
        metadata=req.metadata,
        retention_days=req.retention_days,
    )


def get_session_to_pb(req: router_pb2.GetSessionRequest, tenant: str) -> session_pb2.GetSessionRequest:
    return session_pb2.GetSessionRequest(tenant=tenant, session_id=req.session_id)


def get_history_to_pb(req: router_pb2.GetHistoryRequest, tenant: str) -> session_pb2.GetHistoryRequest:
    return session_pb2.GetHistoryRequest(
        tenant=tenant, session_id=req.session_id, after_seq=req.after_seq, page_size=req.page_size
    )


def get_history_from_pb(resp: session_pb2.GetHistoryResponse) -> router_pb2.GetHistoryResponse:
    return router_pb2.GetHistoryResponse(messages=resp.messages, has_more=resp.has_more)


def append_to_pb(req: router_pb2.AppendMessagesRequest, tenant: str) -> session_pb2.AppendMessagesRequest:
    out = session_pb2.AppendMessagesRequest(tenant=tenant, session_id=req.session_id, messages=req.messages)
    if req.HasField("expected_last_seq"):
        out.expected_last_seq = req.expected_last_seq
    return out


def append_from_pb(resp: session_pb2.AppendMessagesResponse) -> router_pb2.AppendMessagesResponse:
    return router_pb2.AppendMessagesResponse(messages=resp.messages, last_seq=resp.last_seq)


def delete_session_to_pb(
    req: router_pb2.DeleteSessionRequest, tenant: str
) -> session_pb2.DeleteSessionRequest:
    return session_pb2.DeleteSessionRequest(tenant=tenant, session_id=req.session_id)


def export_to_pb(req: router_pb2.ExportUserDataRequest, tenant: str) -> session_pb2.ExportUserDataRequest:
    return session_pb2.ExportUserDataRequest(tenant=tenant, user_id=req.user_id)


def first_message_without_role(req: router_pb2.AppendMessagesRequest) -> int | None:
    """Index of the first message without a role, or None when all have one."""
    for i, m in enumerate(req.messages):
        if m.role not in _ROLE_FROM_PB:
            return i
    return None


# --- Embed, catalog, status --------------------------------------------------------------


def embed_from_pb(req: router_pb2.EmbedRequest) -> EmbedParams:
    return EmbedParams(model=req.model, inputs=tuple(req.inputs), request_id=req.request_id)


def embed_request_to_pb(
    req: router_pb2.EmbedRequest, request_id: str, model_id: str
) -> embedder_pb2.EmbedRequest:
    out = embedder_pb2.EmbedRequest(request_id=request_id, model=model_id, inputs=req.inputs)
    if req.HasField("normalize"):
        out.normalize = req.normalize
    if req.HasField("truncate"):
        out.truncate = req.truncate
    return out


def embed_response_from_pb(resp: embedder_pb2.EmbedResponse) -> router_pb2.EmbedResponse:
    out = router_pb2.EmbedResponse(
        model=resp.model,
        embeddings=[
            router_pb2.Embedding(values=e.values, truncated=e.truncated, token_count=e.token_count)
            for e in resp.embeddings
        ],
    )
    if resp.HasField("usage"):
        out.usage.CopyFrom(resp.usage)
    return out


def list_models_to_pb(
    models: Sequence[ModelSpec], default_chat: str, default_embedding: str
) -> router_pb2.ListModelsResponse:
    return router_pb2.ListModelsResponse(
        models=[model_to_pb(m) for m in models],
        default_chat_model=default_chat,
        default_embedding_model=default_embedding,
    )


def endpoint_status_to_pb(view: EndpointView) -> router_pb2.EndpointStatus:
    out = router_pb2.EndpointStatus(
        address=view.address,
        kind=_ENDPOINT_KIND_TO_PB[view.kind],
        healthy=view.usable,
        report_age_ms=0 if view.report_age_s is None else max(1, round(view.report_age_s * 1000)),
        detail=view.detail,
    )
    if view.load is not None:
        out.load.CopyFrom(load_to_pb(view.load))
    return out


def cluster_status_to_pb(router_id: str, views: Sequence[EndpointView]) -> router_pb2.ClusterStatus:
    return router_pb2.ClusterStatus(router_id=router_id, endpoints=[endpoint_status_to_pb(v) for v in views])
