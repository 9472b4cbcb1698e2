"""Result caches: LRU order and bounds, Redis round trip and outage, hit counting."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from services.embedder.cache import Cached, HitCounter, LruCache, RedisCache, create_cache


def entry(*values: float, tokens: int = 3) -> Cached:
    return Cached(np.array(values, dtype=np.float32), tokens)


async def test_lru_returns_hits_in_order_and_none_for_misses() -> None:
    cache = LruCache(4)
    await cache.put_many([("a", entry(1, 2)), ("b", entry(3, 4, tokens=7))])
    found = await cache.get_many(["b", "x", "a"])
    assert found[1] is None
    assert found[0] is not None and found[0].tokens == 7
    np.testing.assert_array_equal(found[0].vector, [3, 4])
    assert found[2] is not None and found[2].tokens == 3


async def test_lru_drops_the_least_recently_used() -> None:
    cache = LruCache(2)
    await cache.put_many([("a", entry(1)), ("b", entry(2))])
    await cache.get_many(["a"])  # a is now more recent than b
    await cache.put_many([("c", entry(3))])
    assert len(cache) == 2
    assert [e is not None for e in await cache.get_many(["a", "b", "c"])] == [True, False, True]


def test_lru_needs_room() -> None:
    with pytest.raises(ValueError, match="max_entries=0: must be >= 1"):
        LruCache(0)


def test_hit_counter_ratio() -> None:
    counter = HitCounter()
    assert counter.ratio == 0.0
    counter.add(4, 1)
    counter.add(4, 3)
    assert (counter.lookups, counter.hits, counter.ratio) == (8, 4, 0.5)


@pytest.mark.parametrize(
    ("entries", "url", "kind"),
    [(0, "", None), (10, "", LruCache), (10, "redis://127.0.0.1:6379/0", RedisCache)],
)
async def test_create_cache_picks_redis_then_lru_then_none(entries: int, url: str, kind: type | None) -> None:
    cache = create_cache(max_entries=entries, redis_url=url, prefix="p:", ttl_s=60)
    if kind is None:
        assert cache is None
    else:
        assert isinstance(cache, kind)
        await cache.close()


async def test_redis_round_trip_keeps_vector_and_tokens(redis_url: str) -> None:
    cache = RedisCache(redis_url, prefix=f"test:embed:{secrets.token_hex(4)}:", ttl_s=60)
    try:
        vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
        await cache.put_many([("héllo 🙂", Cached(vector, 12))])
        hit, miss = await cache.get_many(["héllo 🙂", "never stored"])
        assert miss is None
        assert hit is not None and hit.tokens == 12 and hit.vector.dtype == np.float32
        np.testing.assert_array_equal(hit.vector, vector)
        ttl = await cache._redis.ttl(cache.key("héllo 🙂"))
        assert 0 < ttl <= 60
    finally:
        await cache.close()


async def test_redis_value_that_is_not_ours_is_a_miss(redis_url: str) -> None:
    cache = RedisCache(redis_url, prefix=f"test:embed:{secrets.token_hex(4)}:", ttl_s=60)
    try:
        await cache._redis.set(cache.key("x"), b"\x01\x02\x03\x04\x05", ex=60)  # shared Redis: expire
        assert await cache.get_many(["x"]) == [None]
    finally:
        await cache.close()


async def test_unreachable_redis_means_misses_not_errors() -> None:
    # Port 1 on loopback refuses connections.
    cache = RedisCache("redis://127.0.0.1:1/0", prefix="test:", ttl_s=60, timeout_s=0.2)
    try:
        await cache.put_many([("a", entry(1))])
        assert await cache.get_many(["a", "b"]) == [None, None]
    finally:
        await cache.close()
