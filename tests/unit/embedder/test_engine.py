"""Request logic with a fake model: validation messages, truncation, normalisation, usage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from services.common.device import DeviceStats
from services.common.errors import InvalidArgument
from services.common.model_card import ModelCard
from services.embedder.cache import LruCache
from services.embedder.domain import EmbedQuery, Vector
from services.embedder.engine import EmbedEngine, normalize


class FakeModel:
    """Words are tokens, plus 2 special ones; the vector of a text is (words, chars, 1)."""

    max_seq_length = 6

    def __init__(self) -> None:
        self.encoded: list[list[str]] = []

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) + 2 for t in texts]

    def encode(self, texts: list[str]) -> list[Vector]:
        self.encoded.append(list(texts))
        return [np.array([len(t.split()), len(t), 1.0], dtype=np.float32) for t in texts]

    def describe(self, model_id: str) -> ModelCard:
        return ModelCard(model_id, "embedding", self.max_seq_length, "fake", "small", "fake", embedding_dim=3)

    def device(self) -> DeviceStats:
        return DeviceStats("cpu", "fake cpu", 100, 10, "float32")


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbedEngine]:
    eng = EmbedEngine(
        FakeModel(),
        model_id="fake-embed",
        max_items_per_request=4,
        max_batch_tokens=64,
        max_wait_s=0.001,
        max_input_chars=40,
    )
    await eng.start()
    yield eng
    await eng.close()


async def test_start_runs_a_warm_up_embedding(engine: EmbedEngine) -> None:
    assert isinstance(engine.model, FakeModel)
    assert engine.model.encoded[0] == ["warm-up"]


async def test_vectors_in_input_order_normalised_by_default(engine: EmbedEngine) -> None:
    result = await engine.embed(EmbedQuery(inputs=["one two", "three"], model="fake-embed"))
    assert result.model == "fake-embed"
    raw = [np.array([2, 7, 1.0]), np.array([1, 5, 1.0])]
    for item, expected in zip(result.items, raw, strict=True):
        np.testing.assert_allclose(item.vector, expected / np.linalg.norm(expected), rtol=1e-6)
        assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-6)
    assert [i.token_count for i in result.items] == [4, 3]
    assert result.prompt_tokens == 7


async def test_normalize_false_gives_raw_vectors(engine: EmbedEngine) -> None:
    result = await engine.embed(EmbedQuery(inputs=["one two"], normalize=False))
    np.testing.assert_array_equal(result.items[0].vector, [2, 7, 1])


async def test_over_long_input_is_truncated_and_flagged(engine: EmbedEngine) -> None:
    result = await engine.embed(EmbedQuery(inputs=["a b c d e f g", "a b"]))
    assert [(i.truncated, i.token_count) for i in result.items] == [(True, 6), (False, 4)]


async def test_input_over_the_character_cap_is_cut_and_flagged(engine: EmbedEngine) -> None:
    assert isinstance(engine.model, FakeModel)
    text = "x" * 100
    result = await engine.embed(EmbedQuery(inputs=[text], normalize=False))
    assert result.items[0].truncated
    assert engine.model.encoded[-1] == ["x" * 40]


@pytest.mark.parametrize(
    ("query", "field", "limit_text"),
    [
        (EmbedQuery(inputs=["a"], model="other"), "model", "'fake-embed'"),
        (EmbedQuery(inputs=[]), "inputs", "at least 1"),
        (EmbedQuery(inputs=["a"] * 5), "inputs", "5 inputs is over the limit of 4"),
        (EmbedQuery(inputs=["a", "", "b"]), "inputs[1]", "must not be empty"),
        (
            EmbedQuery(inputs=["a", "a b c d e f g"], truncate=False),
            "inputs[1]",
            "9 tokens is over the model's limit of 6",
        ),
        (EmbedQuery(inputs=["y" * 41], truncate=False), "inputs[0]", "41 characters is over the limit of 40"),
    ],
)
async def test_bad_input_names_the_field_and_the_limit(
    engine: EmbedEngine, query: EmbedQuery, field: str, limit_text: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await engine.embed(query)
    assert info.value.field == field
    assert limit_text in info.value.message


async def test_load_reports_the_model_the_device_and_draining(engine: EmbedEngine) -> None:
    load = engine.load()
    assert load.model.id == "fake-embed"
    assert load.device.name == "fake cpu"
    assert (load.waiting, load.running, load.draining) == (0, 0, False)
    assert load.items_per_s > 0


def test_normalize_leaves_a_zero_vector_finite() -> None:
    out = normalize(np.zeros(3, dtype=np.float32))
    assert np.all(np.isfinite(out))
    assert out.dtype == np.float32


async def test_drain_flags_load_reports_and_wakes_waiters() -> None:
    eng = EmbedEngine(FakeModel(), model_id="m", max_items_per_request=1, max_batch_tokens=8, max_wait_s=0)
    await eng.start()
    try:
        assert await eng.wait_draining(0.01) is False
        await eng.drain()
        assert eng.load().draining
        assert await eng.wait_draining(10) is True
    finally:
        await eng.close()


@pytest.fixture
async def cached_engine() -> AsyncIterator[EmbedEngine]:
    eng = EmbedEngine(
        FakeModel(),
        model_id="fake-embed",
        max_items_per_request=4,
        max_batch_tokens=64,
        max_wait_s=0.001,
        max_input_chars=40,
        cache=LruCache(16),
    )
    await eng.start()
    yield eng
    await eng.close()


async def test_repeated_texts_come_from_the_cache_with_their_own_flags(cached_engine: EmbedEngine) -> None:
    model = cached_engine.model
    assert isinstance(model, FakeModel)
    first = await cached_engine.embed(EmbedQuery(inputs=["a b c d e f g", "one two"]))
    calls = len(model.encoded)
    again = await cached_engine.embed(
        EmbedQuery(inputs=["one two", "new one", "a b c d e f g"], normalize=False)
    )
    # Only the new text reached the model.
    assert model.encoded[calls:] == [["new one"]]
    np.testing.assert_array_equal(again.items[0].vector, [2, 7, 1])
    np.testing.assert_array_equal(again.items[2].vector, [7, 13, 1])
    np.testing.assert_allclose(first.items[0].vector, np.array([7, 13, 1]) / np.linalg.norm([7, 13, 1]))
    assert [(i.truncated, i.token_count) for i in again.items] == [(False, 4), (False, 4), (True, 6)]
    # first (2 misses), again (2 hits of 3); the warm-up runs the model, never the cache.
    assert cached_engine.load().cache_hit_rate == pytest.approx(2 / 5)


async def test_a_cached_over_long_text_is_still_rejected_without_truncation(
    cached_engine: EmbedEngine,
) -> None:
    await cached_engine.embed(EmbedQuery(inputs=["a b c d e f g"]))
    with pytest.raises(InvalidArgument) as info:
        await cached_engine.embed(EmbedQuery(inputs=["a b c d e f g"], truncate=False))
    assert (info.value.field, "9 tokens is over the model's limit of 6" in info.value.message) == (
        "inputs[0]",
        True,
    )


async def test_no_cache_means_a_hit_rate_of_zero(engine: EmbedEngine) -> None:
    await engine.embed(EmbedQuery(inputs=["one two"]))
    await engine.embed(EmbedQuery(inputs=["one two"]))
    assert engine.load().cache_hit_rate == 0.0
