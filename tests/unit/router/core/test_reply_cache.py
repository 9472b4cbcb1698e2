"""Reply cache: bounded, least recently used out first, hits and misses counted."""

from __future__ import annotations

import pytest

from services.router.core.reply_cache import CachedReply, ReplyCache


def reply(text: str) -> CachedReply:
    return CachedReply("m", text, (1, 2), 1, 3, 2)


def test_keeps_the_most_recently_used_entries() -> None:
    cache = ReplyCache(2)
    cache.put("a", reply("A"))
    cache.put("b", reply("B"))
    assert cache.get("a") == reply("A")  # a is now the most recent
    cache.put("c", reply("C"))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 2)


def test_zero_entries_keeps_nothing_and_negative_is_refused() -> None:
    cache = ReplyCache(0)
    cache.put("a", reply("A"))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries=-1"):
        ReplyCache(-1)
