"""Reply cache: bounded, least recently used out first, hits and misses counted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.router.core.domain import ChatRole, ChatTurn, FinishReason, Sampling, WorkerRequest
from services.router.core.reply_cache import CachedReply, ReplyCache, reply_key


def reply(text: str) -> CachedReply:
    return CachedReply("m", text, (1, 2), FinishReason.STOP, 3, 2)


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


def test_the_key_is_what_decides_the_reply_not_the_id_or_priority() -> None:
    request = WorkerRequest(
        "r1", "m", 16, messages=(ChatTurn(ChatRole.USER, "hi"),), sampling=Sampling(seed=3)
    )
    assert reply_key(replace(request, request_id="r2", priority=4)) == reply_key(request)
    for changed in (
        replace(request, model="other"),
        replace(request, max_tokens=17),
        replace(request, messages=(ChatTurn(ChatRole.USER, "hi!"),)),
        replace(request, messages=(ChatTurn(ChatRole.SYSTEM, "hi"),)),
        replace(request, sampling=Sampling(seed=4)),
        replace(request, stop=("\n",)),
    ):
        assert reply_key(changed) != reply_key(request), changed
