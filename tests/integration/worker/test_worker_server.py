"""The worker over real gRPC: streaming, sampling, stops, bad input, cancellation, load, info."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.common.v1 import common_pb2
from infermesh.worker.v1 import worker_pb2
from tests.fixtures.prompts import CAPITAL_QUESTION
from tests.fixtures.timing import assert_paced

from .conftest import CONTEXT, RunningWorker

pytestmark = pytest.mark.slow

USER = common_pb2.ROLE_USER
PARIS = [common_pb2.ChatMessage(role=USER, content=CAPITAL_QUESTION)]


def request(**kwargs: Any) -> worker_pb2.GenerateRequest:
    kwargs.setdefault("messages", PARIS)
    return worker_pb2.GenerateRequest(**kwargs)


async def generate(worker: RunningWorker, **kwargs: Any) -> list[worker_pb2.GenerateResponse]:
    return [r async for r in worker.stub.Generate(request(**kwargs), timeout=60)]


def text_of(responses: list[worker_pb2.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


def ids_of(responses: list[worker_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


async def test_health_serving_once_started(worker: RunningWorker) -> None:
    health = health_pb2_grpc.HealthStub(worker.channel)
    for service in ("", "infermesh.worker.v1.Worker"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_probe_runs_a_token_through_the_real_engine(worker: RunningWorker) -> None:
    before = worker.service.engine.passes
    assert await worker.service.health.probe() is True
    assert worker.service.engine.passes > before


async def test_probe_verdict_reaches_grpc_health(worker: RunningWorker) -> None:
    health = health_pb2_grpc.HealthStub(worker.channel)
    try:
        await worker.service.serving.publish(False)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await worker.service.serving.publish(True)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_generate_streams_the_answer(worker: RunningWorker) -> None:
    responses = await generate(worker, request_id="paris", max_tokens=32)
    assert "Paris" in text_of(responses)
    assert len(responses) > 3
    assert responses[0].model == "smollm2-135m-instruct"
    assert all(r.model == "" for r in responses[1:])
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert last.usage.prompt_tokens > 10
    assert last.usage.completion_tokens == len(ids_of(responses))


async def test_prompt_and_token_ids_inputs(worker: RunningWorker) -> None:
    by_text = await generate(worker, messages=[], prompt="The capital of France is", max_tokens=4)
    assert by_text[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert by_text[-1].usage.completion_tokens == 4
    tokenized = await worker.stub.Tokenize(worker_pb2.TokenizeRequest(prompt="The capital of France is"))
    by_ids = await generate(worker, messages=[], prompt_token_ids=tokenized.token_ids, max_tokens=4)
    assert ids_of(by_ids) == ids_of(by_text)


async def test_seeded_sampling_is_reproducible(worker: RunningWorker) -> None:
    def sampled(seed: int) -> dict[str, Any]:
        sampling = common_pb2.SamplingParams(temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        messages = [common_pb2.ChatMessage(role=USER, content="Write a poem about autumn.")]
        return {"messages": messages, "sampling": sampling, "max_tokens": 24}

    # Once before, so that both runs find the prompt's blocks in the prefix cache: the default
    # worker picks its kernels by how many rows a pass carries, and a cached prompt is a shorter
    # pass (a fixed dtype and weight format make the first run agree too).
    await generate(worker, **sampled(1))
    first = ids_of(await generate(worker, **sampled(7)))
    again = ids_of(await generate(worker, **sampled(7)))
    other = ids_of(await generate(worker, **sampled(8)))
    assert len(first) == 24
    assert first == again
    assert first != other


async def test_logprobs_of_chosen_tokens(worker: RunningWorker) -> None:
    responses = await generate(worker, max_tokens=6, sampling=common_pb2.SamplingParams(logprobs=True))
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert len(logprobs) == len(ids_of(responses))
    assert all(lp <= 0 for lp in logprobs)
    assert max(logprobs) > -1.0  # greedy picks on an easy prompt are likely tokens


async def test_stop_string_is_honoured_and_trimmed(worker: RunningWorker) -> None:
    responses = await generate(worker, max_tokens=32, stop=[" Paris"])
    text = text_of(responses)
    assert "Paris" not in text
    assert "France" in text
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_stop_token_id_ends_generation(worker: RunningWorker) -> None:
    full = ids_of(await generate(worker, max_tokens=32))
    stopped = await generate(worker, max_tokens=32, stop_token_ids=[full[3]])
    assert ids_of(stopped) == full[:4]
    assert stopped[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_resume_continues_after_delivered_tokens(worker: RunningWorker) -> None:
    full = await generate(worker, max_tokens=32)
    ids = ids_of(full)
    resumed = await generate(worker, max_tokens=32, resume_token_ids=ids[:3])
    assert ids[:3] + ids_of(resumed) == ids
    assert text_of(full).endswith(text_of(resumed))
    assert resumed[-1].usage.completion_tokens == len(ids)


async def test_max_tokens_past_context_stops_at_context_with_length(worker: RunningWorker) -> None:
    context = worker.service.card.context_length
    prompt = [504] * (context - 3)
    responses = await generate(
        worker,
        messages=[],
        prompt_token_ids=prompt,
        max_tokens=100,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )
    assert len(ids_of(responses)) == 3
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


SAMPLING = common_pb2.SamplingParams
BAD_INPUTS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown model", {"model": "gpt-9"}, ["model", "smollm2-135m-instruct"]),
    ("no input", {"messages": []}, ["messages/prompt/prompt_token_ids", "got none"]),
    ("two inputs", {"prompt": "hi"}, ["messages/prompt/prompt_token_ids", "messages and prompt"]),
    ("empty messages", {"messages": [common_pb2.ChatMessage(role=USER, content="")]}, ["messages"]),
    ("unset role", {"messages": [common_pb2.ChatMessage(content="hi")]}, ["messages[0].role"]),
    ("zero max_tokens", {"max_tokens": 0}, ["max_tokens", ">= 1"]),
    ("negative max_tokens", {"max_tokens": -4}, ["max_tokens", ">= 1"]),
    ("huge max_tokens", {"max_tokens": 100_000}, ["max_tokens", "<= 4096"]),
    ("negative temperature", {"sampling": SAMPLING(temperature=-1)}, ["sampling.temperature", ">= 0"]),
    ("zero top_p", {"sampling": SAMPLING(top_p=0)}, ["sampling.top_p", "(0, 1]"]),
    ("top_p above one", {"sampling": SAMPLING(top_p=1.5)}, ["sampling.top_p", "(0, 1]"]),
    ("min_p of one", {"sampling": SAMPLING(min_p=1)}, ["sampling.min_p", "[0, 1)"]),
    ("negative min_p", {"sampling": SAMPLING(min_p=-0.5)}, ["sampling.min_p", "[0, 1)"]),
    ("negative top_k", {"sampling": SAMPLING(top_k=-2)}, ["sampling.top_k", ">= 0"]),
    ("zero penalty", {"sampling": SAMPLING(repetition_penalty=0)}, ["sampling.repetition_penalty", "> 0"]),
    ("prompt id too big", {"messages": [], "prompt_token_ids": [1, 49152]}, ["prompt_token_ids[1]", "49152"]),
    ("negative prompt id", {"messages": [], "prompt_token_ids": [-1]}, ["prompt_token_ids[0]", "49152"]),
    ("stop id outside", {"stop_token_ids": [10**6]}, ["stop_token_ids[0]", "49152"]),
    ("resume id outside", {"resume_token_ids": [-7]}, ["resume_token_ids[0]", "49152"]),
    ("empty stop string", {"stop": [""]}, ["stop[0]"]),
    (
        "prompt over context",
        {"messages": [], "prompt_token_ids": [504] * CONTEXT},
        ["prompt_token_ids", f"{CONTEXT} prompt tokens", f"context length {CONTEXT}"],
    ),
    (
        "prompt plus resume over context",
        {"messages": [], "prompt_token_ids": [504] * (CONTEXT - 100), "resume_token_ids": [504] * 200},
        [
            "prompt_token_ids",
            f"{CONTEXT - 100} prompt tokens + 200 resume tokens",
            f"context length {CONTEXT}",
        ],
    ),
    (
        "long chat over context",
        {"messages": [common_pb2.ChatMessage(role=USER, content="word " * CONTEXT)]},
        ["messages", "prompt tokens", f"context length {CONTEXT}"],
    ),
]


@pytest.mark.parametrize(("case", "fields", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_naming_the_field(
    worker: RunningWorker, case: str, fields: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(worker, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for part in expected:
        assert part in (info.value.details() or "")


async def test_still_serves_after_bad_input(worker: RunningWorker) -> None:
    for _, fields, _ in BAD_INPUTS[:5]:
        with pytest.raises(grpc.aio.AioRpcError):
            await generate(worker, **fields)
    assert "Paris" in text_of(await generate(worker, max_tokens=16))


async def test_cancelled_stream_frees_the_engine(worker: RunningWorker) -> None:
    long = worker.stub.Generate(request(max_tokens=4000, sampling=SAMPLING(ignore_eos=True)), timeout=60)
    received = 0
    async for _ in long:
        received += 1
        if received == 3:
            break
    long.cancel()
    responses = await generate(worker, max_tokens=8)
    assert responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    # The abandoned request (minutes from its 4000 tokens) left the engine before this one ended.
    load = worker.service.engine.load()
    assert (load.running, load.waiting) == (0, 0)
    assert worker.service.engine.scheduler.blocks.num_used_blocks == 0


async def test_deadline_stops_generation(worker: RunningWorker) -> None:
    call = worker.stub.Generate(request(max_tokens=4000, sampling=SAMPLING(ignore_eos=True)), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The engine notices between two forward passes, well before the 4000 tokens.
    for _ in range(50):
        if worker.service.engine.load().running == 0:
            break
        await asyncio.sleep(0.05)
    assert worker.service.engine.load().running == 0


async def test_tokenize_applies_the_chat_template(worker: RunningWorker) -> None:
    chat = await worker.stub.Tokenize(worker_pb2.TokenizeRequest(messages=PARIS))
    plain = await worker.stub.Tokenize(worker_pb2.TokenizeRequest(prompt=CAPITAL_QUESTION))
    assert chat.context_length == plain.context_length == CONTEXT
    assert len(chat.token_ids) > len(plain.token_ids) + 5  # template turns around the question
    assert plain.token_ids  # the question's tokens appear inside the templated ones
    joined = ",".join(map(str, chat.token_ids))
    assert ",".join(map(str, plain.token_ids)) in joined
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.stub.Tokenize(worker_pb2.TokenizeRequest(messages=PARIS, prompt="x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_info_describes_model_and_device(worker: RunningWorker) -> None:
    info = await worker.stub.GetInfo(worker_pb2.GetInfoRequest())
    assert info.endpoint_id == "worker-under-test"
    (model,) = info.models
    assert (model.id, model.kind, model.context_length) == (
        "smollm2-135m-instruct",
        common_pb2.MODEL_KIND_CHAT,
        CONTEXT,
    )
    assert (model.family, model.tier, model.source) == ("llama", "small", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info.device.type == common_pb2.DEVICE_TYPE_CPU
    # The kernels the worker chose at start, by batch size (dtype and weights auto).
    plan = worker.service.runner.plan
    assert info.device.dtype == plan.describe()
    assert all(kernel.name in info.device.dtype for kernel in plan.kernels)
    assert info.device.memory_total_bytes > info.device.memory_used_bytes > 0


async def test_stream_load_reports_at_the_interval(worker: RunningWorker) -> None:
    await generate(worker, max_tokens=8)  # something to have measured
    reports = []
    call = worker.stub.StreamLoad(worker_pb2.StreamLoadRequest(interval_ms=50), timeout=10)
    async for report in call:
        reports.append(report)
        if len(reports) == 4:
            break
    call.cancel()
    await assert_paced([r.at.ToNanoseconds() for r in reports], 0.05)
    last = reports[-1]
    assert last.endpoint_id == "worker-under-test"
    assert [m.id for m in last.models] == ["smollm2-135m-instruct"]
    assert last.decode_tokens_per_s > 0 and last.prefill_tokens_per_s > 0
    assert last.device.type == common_pb2.DEVICE_TYPE_CPU
    assert not last.draining
    assert reports[0].at.ToNanoseconds() < last.at.ToNanoseconds()


async def test_stream_load_shows_a_running_batch_and_its_kv_blocks(worker: RunningWorker) -> None:
    long_request = request(max_tokens=60, sampling=SAMPLING(ignore_eos=True))
    calls = [worker.stub.Generate(long_request) for _ in range(2)]
    consumers = [asyncio.create_task(_drain_call(c)) for c in calls]
    seen = None
    load = worker.stub.StreamLoad(worker_pb2.StreamLoadRequest(interval_ms=20), timeout=20)
    async for report in load:
        if report.running == 2:
            seen = report
            break
    load.cancel()
    for c in calls:
        c.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    assert seen is not None, "the two requests never ran in one batch"
    assert seen.running_tokens > 60
    assert 0 < seen.kv_blocks_free < seen.kv_blocks_total


async def test_two_hundred_cancelled_streams_leave_no_kv_block_in_use(worker: RunningWorker) -> None:
    engine = worker.service.engine
    calls = [
        worker.stub.Generate(
            request(prompt=f"Count to {i}.", max_tokens=200, sampling=SAMPLING(ignore_eos=True))
        )
        for i in range(200)
    ]
    consumers = [asyncio.create_task(_drain_call(c)) for c in calls]
    for _ in range(200):
        if engine.load().running > 0:
            break
        await asyncio.sleep(0.05)
    assert engine.scheduler.blocks.num_used_blocks > 0
    for c in calls:
        c.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    for _ in range(100):
        if engine.scheduler.blocks.num_used_blocks == 0:
            break
        await asyncio.sleep(0.05)
    load = engine.load()
    assert (load.running, load.waiting, engine.scheduler.blocks.num_used_blocks) == (0, 0, 0)
    assert load.kv_blocks_free == load.kv_blocks_total


async def _drain_call(call: Any) -> None:
    async for _ in call:
        pass


async def test_stream_load_rejects_tiny_interval(worker: RunningWorker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in worker.stub.StreamLoad(worker_pb2.StreamLoadRequest(interval_ms=1)):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interval_ms" in (info.value.details() or "")
