"""Protobuf at the edge: the only module that turns worker messages into plain values and back."""

from __future__ import annotations

from collections.abc import Iterable

from infermesh.common.v1 import common_pb2
from infermesh.worker.v1 import worker_pb2
from services.common.convert import device_to_pb, model_info_to_pb, timestamp_to_pb
from services.common.device import DeviceStats
from services.common.model_card import ModelCard
from services.worker.request import ChatTurn, GenerateRequest, SamplingParams
from services.worker.sequence import Delta, Finish
from services.worker.service import LoadSnapshot

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
_FINISH = {
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def messages_from_pb(messages: Iterable[common_pb2.ChatMessage]) -> tuple[ChatTurn, ...]:
    # An unset or unknown role becomes "", which validation rejects naming the message.
    return tuple(ChatTurn(_ROLES.get(m.role, ""), m.content) for m in messages)


def sampling_from_pb(s: common_pb2.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else defaults.temperature,
        top_k=s.top_k if s.HasField("top_k") else defaults.top_k,
        top_p=s.top_p if s.HasField("top_p") else defaults.top_p,
        min_p=s.min_p if s.HasField("min_p") else defaults.min_p,
        repetition_penalty=s.repetition_penalty
        if s.HasField("repetition_penalty")
        else defaults.repetition_penalty,
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )


def generate_request_from_pb(req: worker_pb2.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        request_id=req.request_id,
        model=req.model,
        messages=messages_from_pb(req.messages),
        prompt=req.prompt if req.HasField("prompt") else None,
        prompt_token_ids=tuple(req.prompt_token_ids),
        sampling=sampling_from_pb(req.sampling),
        max_tokens=req.max_tokens if req.HasField("max_tokens") else None,
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        resume_token_ids=tuple(req.resume_token_ids),
        priority=req.priority or common_pb2.PRIORITY_STANDARD,
    )


def delta_to_pb(delta: Delta, model: str = "") -> worker_pb2.GenerateResponse:
    resp = worker_pb2.GenerateResponse(
        text=delta.text, token_ids=delta.token_ids, logprobs=delta.logprobs, model=model
    )
    if delta.finish is not None:
        resp.finish_reason = _FINISH[delta.finish]
    if delta.usage is not None:
        resp.usage.prompt_tokens = delta.usage.prompt_tokens
        resp.usage.completion_tokens = delta.usage.completion_tokens
    return resp


def info_to_pb(
    endpoint_id: str, models: Iterable[ModelCard], device: DeviceStats
) -> worker_pb2.GetInfoResponse:
    return worker_pb2.GetInfoResponse(
        endpoint_id=endpoint_id, models=[model_info_to_pb(m) for m in models], device=device_to_pb(device)
    )


def load_to_pb(snap: LoadSnapshot) -> common_pb2.LoadReport:
    e = snap.engine
    return common_pb2.LoadReport(
        endpoint_id=snap.endpoint_id,
        at=timestamp_to_pb(snap.at),
        models=[model_info_to_pb(m) for m in snap.models],
        device=device_to_pb(snap.device),
        running=e.running,
        waiting=e.waiting,
        running_tokens=e.running_tokens,
        waiting_tokens=e.waiting_tokens,
        decode_tokens_per_s=e.decode_tokens_per_s,
        prefill_tokens_per_s=e.prefill_tokens_per_s,
        draining=e.draining,
        kv_blocks_free=e.kv_blocks_free,
        kv_blocks_total=e.kv_blocks_total,
        prefix_cache_hit_rate=e.prefix_cache_hit_rate,
        decode_step_fixed_s=e.decode_step_fixed_s,
        decode_step_per_sequence_s=e.decode_step_per_sequence_s,
        decode_step_batch=e.decode_step_batch,
    )
