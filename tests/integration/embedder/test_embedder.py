"""The embedder over real gRPC, checked against sentence-transformers run in-process."""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from infermesh.common.v1 import common_pb2
from infermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.common.device import native_bfloat16
from services.common.server import GrpcServer
from services.embedder.domain import Vector
from services.embedder.model import EmbeddingModel
from services.embedder.server import create_server
from services.embedder.servicer import SERVICE_NAME
from tests.fixtures.timing import assert_paced
from tests.integration.embedder.helpers import embedder_config

pytestmark = pytest.mark.slow

EMBED_PATH = f"/{SERVICE_NAME}/Embed"
TEXTS = [
    "The cat sat on the mat.",
    "A quarterly report on semiconductor supply chains.",
    "Wie spät ist es?",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Paris is the capital of France.",
    "🙂 emoji and ünïcödé",
]
WORDS = "apple river quantum violin glacier harbor pepper orbit canyon lantern meadow cipher".split()
LONG_TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(400))
# What dtype "auto" (the default) computes in on this machine, and how close a raw vector's
# length stays to float32 sentence-transformers in it (directions: cosine >= 0.9999 in both).
DEFAULT_DTYPE = "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"
NORM_RTOL = {"float32": 1e-4, "bfloat16": 5e-3}[DEFAULT_DTYPE]


def vectors(response: embedder_pb2.EmbedResponse) -> npt.NDArray[np.float32]:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def assert_same_direction(got: npt.NDArray[np.float32], want: npt.NDArray[np.float32]) -> None:
    assert got.shape == want.shape
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999, cosine


async def embed_ok(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    """The server still answers a plain request."""
    response = await stub.Embed(embedder_pb2.EmbedRequest(inputs=["still serving"]), timeout=30)
    assert len(response.embeddings) == 1 and len(response.embeddings[0].values) == 384


async def test_health_is_serving_and_info_describes_the_model(
    embedder: GrpcServer, channel: grpc.aio.Channel, stub: embedder_pb2_grpc.EmbedderStub
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    info = await stub.GetInfo(embedder_pb2.GetInfoRequest(), timeout=5)
    assert info.endpoint_id == "embedder-under-test"
    (model,) = info.models
    assert (model.id, model.kind) == ("all-minilm-l6-v2", common_pb2.MODEL_KIND_EMBEDDING)
    assert (model.embedding_dim, model.context_length, model.family) == (384, 256, "bert")
    assert info.device.type == common_pb2.DEVICE_TYPE_CPU
    assert info.device.dtype == DEFAULT_DTYPE
    assert info.device.memory_total_bytes > 0


async def test_vectors_match_the_reference_alone_and_in_a_batch(
    stub: embedder_pb2_grpc.EmbedderStub, reference: SentenceTransformer
) -> None:
    want = reference.encode(TEXTS, normalize_embeddings=True)
    batch = await stub.Embed(embedder_pb2.EmbedRequest(inputs=TEXTS, model="all-minilm-l6-v2"), timeout=30)
    alone = [await stub.Embed(embedder_pb2.EmbedRequest(inputs=[t]), timeout=30) for t in TEXTS]
    assert batch.model == "all-minilm-l6-v2"
    for got in (vectors(batch), np.concatenate([vectors(r) for r in alone])):
        assert got.shape == (len(TEXTS), 384)
        assert_same_direction(got, want)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


async def test_normalize_false_gives_the_raw_vectors(
    stub: embedder_pb2_grpc.EmbedderStub, reference: SentenceTransformer
) -> None:
    # The packaged model ends in a Normalize module; raw means the pooled vectors before it.
    modules = list(reference)
    assert type(modules[-1]).__name__ == "Normalize"
    pooled_only = SentenceTransformer(modules=modules[:-1], device="cpu")
    want = pooled_only.encode(TEXTS, normalize_embeddings=False)
    got = vectors(await stub.Embed(embedder_pb2.EmbedRequest(inputs=TEXTS, normalize=False), timeout=30))
    assert_same_direction(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=NORM_RTOL)
    assert np.abs(np.linalg.norm(got, axis=1) - 1.0).max() > 0.01


async def test_concurrent_callers_each_get_their_own_vectors_in_order(
    stub: embedder_pb2_grpc.EmbedderStub, reference: SentenceTransformer
) -> None:
    requests = [
        [
            f"{WORDS[i % 12]} {WORDS[(i * 5 + j) % 12]} number {i}-{j} " + "more words " * (i % 9)
            for j in range(1 + i % 3)
        ]
        for i in range(200)
    ]
    flat = [t for texts in requests for t in texts]
    want = reference.encode(flat, normalize_embeddings=True)
    responses = await asyncio.gather(
        *(stub.Embed(embedder_pb2.EmbedRequest(inputs=texts), timeout=60) for texts in requests)
    )
    start = 0
    for texts, response in zip(requests, responses, strict=True):
        assert_same_direction(vectors(response), want[start : start + len(texts)])
        start += len(texts)


async def test_over_long_input_is_truncated_and_flagged(
    stub: embedder_pb2_grpc.EmbedderStub, reference: SentenceTransformer
) -> None:
    short = "a short sentence"
    response = await stub.Embed(embedder_pb2.EmbedRequest(inputs=[LONG_TEXT, short]), timeout=30)
    long_item, short_item = response.embeddings
    short_tokens = len(reference.tokenizer(short)["input_ids"])
    assert (long_item.truncated, long_item.token_count) == (True, 256)
    assert (short_item.truncated, short_item.token_count) == (False, short_tokens)
    assert response.usage.prompt_tokens == 256 + short_tokens
    # The model sees the first 256 tokens, exactly as sentence-transformers truncates.
    assert_same_direction(vectors(response), reference.encode([LONG_TEXT, short], normalize_embeddings=True))


@pytest.mark.parametrize(
    ("request_pb", "expected"),
    [
        (embedder_pb2.EmbedRequest(inputs=["x"], model="gpt-embed-9"), "model: unknown model 'gpt-embed-9'"),
        (embedder_pb2.EmbedRequest(inputs=[]), "inputs: must hold at least 1 input"),
        (embedder_pb2.EmbedRequest(inputs=["x", "", "y"]), "inputs[1]: must not be empty"),
        (embedder_pb2.EmbedRequest(inputs=["x"] * 257), "inputs: 257 inputs is over the limit of 256"),
        (
            embedder_pb2.EmbedRequest(inputs=["ok", LONG_TEXT], truncate=False),
            "inputs[1]: 402 tokens is over the model's limit of 256 tokens",
        ),
    ],
    ids=["unknown-model", "no-inputs", "empty-input", "too-many-inputs", "too-long"],
)
async def test_bad_input_is_invalid_argument_naming_field_and_limit(
    stub: embedder_pb2_grpc.EmbedderStub, request_pb: embedder_pb2.EmbedRequest, expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(request_pb, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() is not None and info.value.details().startswith(expected)
    await embed_ok(stub)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x1a\x02ok\x1a\x03ab\xff", "inputs[1]: is not valid UTF-8"),
        (b"\x12\x02\xc3\x28\x1a\x02ok", "model: is not valid UTF-8"),
        (b"\x1a\x20cut short", "request: could not be parsed as infermesh.embedder.v1.EmbedRequest"),
    ],
    ids=["bad-utf8-input", "bad-utf8-model", "broken-wire-format"],
)
async def test_unparseable_request_is_invalid_argument(
    channel: grpc.aio.Channel, stub: embedder_pb2_grpc.EmbedderStub, raw: bytes, expected: str
) -> None:
    call = channel.unary_unary(EMBED_PATH, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() is not None and info.value.details().startswith(expected)
    await embed_ok(stub)


async def test_stream_load_reports_every_interval(stub: embedder_pb2_grpc.EmbedderStub) -> None:
    await embed_ok(stub)
    reports = []
    async for report in stub.StreamLoad(embedder_pb2.StreamLoadRequest(interval_ms=50), timeout=10):
        reports.append(report)
        if len(reports) == 3:
            break
    assert all(r.endpoint_id == "embedder-under-test" for r in reports)
    await assert_paced([r.at.ToNanoseconds() for r in reports], 0.05)
    last = reports[-1]
    assert last.models[0].kind == common_pb2.MODEL_KIND_EMBEDDING
    assert last.device.type == common_pb2.DEVICE_TYPE_CPU
    assert last.items_per_s > 0
    assert (last.waiting, last.running, last.draining) == (0, 0, False)
    # This server runs without a result cache.
    assert last.prefix_cache_hit_rate == 0.0


@pytest.mark.parametrize("interval_ms", [5, 120_000])
async def test_stream_load_rejects_an_interval_out_of_bounds(
    stub: embedder_pb2_grpc.EmbedderStub, interval_ms: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.StreamLoad(embedder_pb2.StreamLoadRequest(interval_ms=interval_ms), timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"interval_ms: {interval_ms} is outside [10, 60000]" in (info.value.details() or "")
    await embed_ok(stub)


async def test_drain_finishes_in_flight_work_and_ends_load_streams() -> None:
    server = await create_server(embedder_config(max_batch_tokens=512))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            stream = stub.StreamLoad(embedder_pb2.StreamLoadRequest(interval_ms=60_000), timeout=30)
            first = await stream.read()
            assert not first.draining
            in_flight = asyncio.ensure_future(
                stub.Embed(embedder_pb2.EmbedRequest(inputs=[LONG_TEXT] * 32), timeout=60)
            )
            await asyncio.sleep(0.2)  # let the request reach the server
            await server.stop(grace=30)
            response = await in_flight
            assert len(response.embeddings) == 32
            last = await stream.read()
            assert last is not grpc.aio.EOF and last.draining
            assert await stream.read() is grpc.aio.EOF
    finally:
        await server.stop(1.0)


async def test_redis_cache_answers_repeats_with_the_same_vectors_and_counts_hits(
    redis_url: str, reference: SentenceTransformer
) -> None:
    server = await create_server(embedder_config(cache_redis_url=redis_url, cache_ttl_s=60))
    await server.start()
    # Fresh texts: Redis outlives test runs.
    run = secrets.token_hex(4)
    first, second, third = (f"{word} number {i} of run {run}" for i, word in enumerate(WORDS[:3]))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            await stub.Embed(embedder_pb2.EmbedRequest(inputs=[first, second]), timeout=30)
            again = await stub.Embed(embedder_pb2.EmbedRequest(inputs=[second, third, first]), timeout=30)
            assert_same_direction(
                vectors(again), reference.encode([second, third, first], normalize_embeddings=True)
            )
            tokens = [len(reference.tokenizer(t)["input_ids"]) for t in (second, third, first)]
            assert [e.token_count for e in again.embeddings] == tokens
            stream = stub.StreamLoad(embedder_pb2.StreamLoadRequest(interval_ms=50), timeout=10)
            report = await stream.read()
            stream.cancel()
            # Lookups: 2, then 3 with 2 hits (the warm-up at start runs the model, not the cache).
            assert report.prefix_cache_hit_rate == pytest.approx(2 / 5)
    finally:
        await server.stop(1.0)


async def test_token_counts_match_the_reference_tokenizer(
    stub: embedder_pb2_grpc.EmbedderStub, reference: SentenceTransformer
) -> None:
    texts = [*TEXTS, LONG_TEXT[:700], "  spaces   between\twords\n", "x" * 300]
    response = await stub.Embed(embedder_pb2.EmbedRequest(inputs=texts), timeout=30)
    want = [min(len(reference.tokenizer(t)["input_ids"]), 256) for t in texts]
    assert [e.token_count for e in response.embeddings] == want
    assert [e.truncated for e in response.embeddings] == [False] * len(texts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_each_dtype_stays_within_the_fidelity_bound(reference: SentenceTransformer, dtype: str) -> None:
    server = await create_server(embedder_config(dtype=dtype, cache_entries=0))
    await server.start()
    texts = [*TEXTS, LONG_TEXT]
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            info = await stub.GetInfo(embedder_pb2.GetInfoRequest(), timeout=5)
            assert info.device.dtype == dtype
            batch = await stub.Embed(embedder_pb2.EmbedRequest(inputs=texts), timeout=30)
            alone = [await stub.Embed(embedder_pb2.EmbedRequest(inputs=[t]), timeout=30) for t in texts]
    finally:
        await server.stop(1.0)
    want = reference.encode(texts, normalize_embeddings=True)
    assert_same_direction(vectors(batch), want)
    assert_same_direction(np.concatenate([vectors(r) for r in alone]), want)


async def test_any_sentence_transformers_folder_serves_its_own_vectors(
    tmp_path: Path, reference: SentenceTransformer
) -> None:
    # Another pipeline on the same weights: CLS pooling and no Normalize module.
    folder = tmp_path / "minilm-cls"
    SentenceTransformer(modules=[reference[0], Pooling(384, pooling_mode="cls")], device="cpu").save(
        str(folder)
    )
    own = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    server = await create_server(
        embedder_config(model_path=str(folder), model_id="minilm-cls", cache_entries=0)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            (model,) = (await stub.GetInfo(embedder_pb2.GetInfoRequest(), timeout=5)).models
            raw = await stub.Embed(embedder_pb2.EmbedRequest(inputs=TEXTS, normalize=False), timeout=30)
            unit = await stub.Embed(embedder_pb2.EmbedRequest(inputs=TEXTS, model="minilm-cls"), timeout=30)
    finally:
        await server.stop(1.0)
    assert (model.id, model.source, model.embedding_dim) == ("minilm-cls", "minilm-cls", 384)
    want = own.encode(TEXTS, normalize_embeddings=False)
    assert_same_direction(vectors(raw), want)
    np.testing.assert_allclose(
        np.linalg.norm(vectors(raw), axis=1), np.linalg.norm(want, axis=1), rtol=NORM_RTOL
    )
    assert_same_direction(vectors(unit), want)
    # Not the packaged model's mean pooling.
    assert np.min(np.sum(vectors(unit) * reference.encode(TEXTS, normalize_embeddings=True), axis=1)) < 0.99


async def test_health_turns_not_serving_while_the_model_is_wedged_and_back_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wedged, release = threading.Event(), threading.Event()
    encode = EmbeddingModel.encode

    def wedging_encode(self: EmbeddingModel, texts: list[str]) -> list[Vector]:
        if wedged.is_set():
            release.wait(30)
        return encode(self, texts)

    monkeypatch.setattr(EmbeddingModel, "encode", wedging_encode)
    server = await create_server(
        embedder_config(health_interval_s=0.1, health_timeout_s=0.5, cache_entries=0)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60)

            async def until(status: int) -> None:
                async with asyncio.timeout(20):
                    while (await watch.read()).status != status:
                        pass

            await until(health_pb2.HealthCheckResponse.SERVING)
            wedged.set()
            await until(health_pb2.HealthCheckResponse.NOT_SERVING)
            wedged.clear()
            release.set()
            await until(health_pb2.HealthCheckResponse.SERVING)
            watch.cancel()
    finally:
        release.set()
        await server.stop(1.0)
