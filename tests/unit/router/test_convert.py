"""Protobuf edge: presence of optional fields survives, load reports round-trip."""

from __future__ import annotations

from infermesh.common.v1 import common_pb2
from infermesh.router.v1 import router_pb2
from infermesh.worker.v1 import worker_pb2
from services.router import convert
from services.router.core.domain import (
    ChatRole,
    ChatTurn,
    Degradation,
    DegradationStep,
    FinishReason,
    ModelKind,
    ReplyChunk,
    Usage,
    WorkerRequest,
)


def test_generate_from_pb_keeps_presence() -> None:
    bare = convert.generate_from_pb(router_pb2.GenerateRequest())
    assert bare.prompt is None and bare.session_id is None and bare.max_tokens is None
    assert bare.sampling.temperature is None and bare.deadline is None

    req = router_pb2.GenerateRequest(
        prompt="",
        session_id="",
        max_tokens=0,
        sampling=common_pb2.SamplingParams(temperature=0.0, top_k=0, seed=0),
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="t"), common_pb2.ChatMessage()],
    )
    req.deadline.FromNanoseconds(1_500_000_000)
    params = convert.generate_from_pb(req)
    assert (params.prompt, params.session_id, params.max_tokens) == ("", "", 0)
    assert (params.sampling.temperature, params.sampling.top_k, params.sampling.seed) == (0.0, 0, 0)
    assert params.sampling.top_p is None
    assert params.messages == (ChatTurn(ChatRole.TOOL, "t"), ChatTurn(None, ""))
    assert params.deadline == 1.5


def test_worker_request_carries_merged_messages_and_caller_settings() -> None:
    req = router_pb2.GenerateRequest(
        stop=["x"],
        stop_token_ids=[7],
        priority=common_pb2.PRIORITY_BATCH,
        sampling=common_pb2.SamplingParams(top_p=0.5, logprobs=True, ignore_eos=True),
    )
    params = convert.generate_from_pb(req)
    merged = (ChatTurn(ChatRole.SYSTEM, "s"), ChatTurn(ChatRole.USER, "u"))
    request = WorkerRequest(
        "rid",
        "m",
        9,
        messages=merged,
        sampling=params.sampling,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        priority=params.priority,
    )
    out = convert.worker_request_to_pb(request, [4, 5])
    assert (out.request_id, out.model, out.max_tokens) == ("rid", "m", 9)
    assert [(m.role, m.content) for m in out.messages] == [
        (common_pb2.ROLE_SYSTEM, "s"),
        (common_pb2.ROLE_USER, "u"),
    ]
    assert list(out.stop) == ["x"] and list(out.stop_token_ids) == [7]
    assert out.priority == common_pb2.PRIORITY_BATCH
    assert out.sampling.top_p == 0.5 and out.sampling.logprobs and out.sampling.ignore_eos
    assert not out.sampling.HasField("temperature") and not out.sampling.HasField("seed")
    assert not out.HasField("prompt")
    assert list(out.resume_token_ids) == [4, 5]


def test_a_worker_message_reaches_the_client_with_what_the_router_adds() -> None:
    resp = worker_pb2.GenerateResponse(
        text="hi",
        token_ids=[1, 2],
        logprobs=[-0.5, -0.25],
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        model="m",
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2, cached_prompt_tokens=1),
    )
    delta = convert.delta_from_pb(resp)
    assert delta.finish is FinishReason.LENGTH and delta.usage == Usage(3, 2, 1)
    assert convert.delta_from_pb(worker_pb2.GenerateResponse(text="a")).finish is None
    chunk = ReplyChunk(
        "rid",
        delta.text,
        delta.token_ids,
        delta.logprobs,
        delta.finish,
        delta.usage,
        model="m",
        session_id="s",
        worker="w:1",
        degraded=(Degradation(DegradationStep.FAILOVER, "moved"),),
    )
    out = convert.reply_chunk_to_pb(chunk)
    assert (out.request_id, out.text, list(out.token_ids), list(out.logprobs)) == (
        "rid",
        "hi",
        [1, 2],
        [-0.5, -0.25],
    )
    assert out.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_prompt_tokens) == (3, 2, 1)
    assert (out.model, out.session_id, out.worker) == ("m", "s", "w:1")
    assert [d.step for d in out.degraded] == [common_pb2.DEGRADATION_STEP_FAILOVER]
    assert not convert.reply_chunk_to_pb(ReplyChunk("rid", "x")).HasField("usage")


def test_load_report_round_trips() -> None:
    report = common_pb2.LoadReport(
        endpoint_id="w",
        models=[common_pb2.ModelInfo(id="m", kind=common_pb2.MODEL_KIND_CHAT, context_length=8)],
        device=common_pb2.DeviceInfo(type=common_pb2.DEVICE_TYPE_CUDA, name="H100", memory_total_bytes=80),
        running=1,
        waiting=2,
        running_tokens=3,
        waiting_tokens=4,
        kv_blocks_free=5,
        kv_blocks_total=6,
        prefix_cache_hit_rate=0.5,
        decode_tokens_per_s=7.5,
        prefill_tokens_per_s=8.5,
        items_per_s=9.5,
        draining=True,
    )
    report.at.FromNanoseconds(2_000_000_000)
    snapshot = convert.load_from_pb(report)
    assert snapshot.device.type == "cuda" and snapshot.models[0].kind is ModelKind.CHAT
    assert snapshot.at == 2.0
    assert convert.load_to_pb(snapshot) == report


def test_degradation_steps_map_by_name() -> None:
    for step in DegradationStep:
        pb = convert.degradation_to_pb(Degradation(step, "why"))
        assert common_pb2.DegradationStep.Name(pb.step) == f"DEGRADATION_STEP_{step.name}"
        assert pb.reason == "why"
