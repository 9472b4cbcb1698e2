"""CachedStore over the in-process cache and a fake store: freshness, races, failures."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest

from services.session.cache import CachedStore, CacheUnavailable, MemoryWindowCache
from services.session.model import AppendResult, EraseResult, Message, NewMessage, Role, Window
from services.session.window import select_window

T, S = "acme", "s1"


class FakeStore:
    """History of one tenant in memory; `window` can be held half-way to stage races."""

    def __init__(self) -> None:
        self.history: dict[str, list[Message]] = {S: []}
        self.window_calls = 0
        self.hold: asyncio.Event | None = None
        self.read_done = asyncio.Event()

    async def append(
        self, tenant: str, session_id: str, messages: Sequence[NewMessage], expected: int | None = None
    ) -> AppendResult:
        stored = self.history[session_id]
        now = dt.datetime.now(dt.UTC)
        new = [
            Message(len(stored) + i + 1, Role(m.role), m.content, "", m.token_count, now)
            for i, m in enumerate(messages)
        ]
        stored.extend(new)
        return AppendResult(new, len(stored))

    async def window(self, tenant: str, session_id: str, token_budget: int) -> Window:
        self.window_calls += 1
        found = list(self.history[session_id])
        chosen, truncated = select_window(found, token_budget)
        result = Window(chosen, len(found), truncated)
        hold = self.hold
        self.read_done.set()
        if hold is not None:
            await hold.wait()
        return result

    async def delete_session(self, tenant: str, session_id: str) -> None:
        self.history[session_id] = []

    async def erase_user(self, tenant: str, user_id: str) -> EraseResult:
        ids = tuple(self.history)
        for session_id in ids:
            self.history[session_id] = []
        return EraseResult(len(ids), 0, ids)

    async def close(self) -> None:
        pass


class FlakyCache(MemoryWindowCache):
    """A MemoryWindowCache that fails every call while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.cleared = 0

    def _check(self) -> None:
        if self.down:
            raise CacheUnavailable("down")

    async def get(self, *args: Any) -> Window | None:
        self._check()
        return await super().get(*args)

    async def fill(self, *args: Any) -> None:
        self._check()
        await super().fill(*args)

    async def invalidate(self, *args: Any) -> None:
        self._check()
        await super().invalidate(*args)

    async def clear(self) -> None:
        self._check()
        self.cleared += 1
        await super().clear()


def user(text: str) -> NewMessage:
    return NewMessage(int(Role.USER), text, token_count=1)


def contents(window: Window) -> list[str]:
    return [m.content for m in window.messages]


def make(retry_s: float = 0.0) -> tuple[CachedStore, FakeStore, FlakyCache]:
    fake, cache = FakeStore(), FlakyCache()
    return CachedStore(fake, cache, retry_s=retry_s), fake, cache  # type: ignore[arg-type]


async def test_second_read_is_a_hit_and_a_write_is_seen_at_once():
    store, fake, _ = make()
    await store.append(T, S, [user("a")])
    assert contents(await store.window(T, S, 10)) == ["a"]
    assert contents(await store.window(T, S, 10)) == ["a"]
    assert fake.window_calls == 1 and (store.stats.hits, store.stats.misses) == (1, 1)

    await store.append(T, S, [user("b")])
    assert contents(await store.window(T, S, 10)) == ["a", "b"]
    # Budgets are cached apart: a window for 1 token is not the one for 10.
    assert contents(await store.window(T, S, 1)) == ["b"]
    assert fake.window_calls == 3


async def test_a_read_that_started_before_a_write_does_not_fill_the_cache():
    store, fake, _ = make()
    await store.append(T, S, [user("a")])
    hold = fake.hold = asyncio.Event()
    slow_read = asyncio.create_task(store.window(T, S, 10))
    await fake.read_done.wait()
    fake.hold = None
    await store.append(T, S, [user("b")])
    # The old read finishes after the write was acknowledged, then tries to fill.
    hold.set()
    assert contents(await slow_read) == ["a"]
    assert contents(await store.window(T, S, 10)) == ["a", "b"]


async def test_delete_and_erase_drop_cached_windows():
    store, _, _ = make()
    await store.append(T, S, [user("a")])
    await store.window(T, S, 10)
    await store.delete_session(T, S)
    assert contents(await store.window(T, S, 10)) == []

    await store.append(T, S, [user("b")])
    await store.window(T, S, 10)
    await store.erase_user(T, "u")
    assert contents(await store.window(T, S, 10)) == []


async def test_cache_failures_fall_back_to_the_store_and_are_counted():
    store, fake, cache = make(retry_s=60)
    await store.append(T, S, [user("a")])
    await store.window(T, S, 10)
    cache.down = True
    assert contents(await store.window(T, S, 10)) == ["a"]
    assert store.stats.errors == 1
    # Skipped while it recovers: no call, no second error, still answered.
    assert contents(await store.window(T, S, 10)) == ["a"]
    assert (store.stats.errors, store.stats.bypassed) == (1, 1)
    assert fake.window_calls == 3


async def test_a_write_whose_invalidation_was_lost_clears_the_cache_before_it_is_used():
    store, _, cache = make(retry_s=0)
    await store.append(T, S, [user("a")])
    await store.window(T, S, 10)
    cache.down = True
    await store.append(T, S, [user("b")])
    assert store.stats.errors == 1
    # The cache comes back with the old window in it (a blip, not a restart).
    cache.down = False
    assert contents(await store.window(T, S, 10)) == ["a", "b"]
    assert cache.cleared == 1


@pytest.mark.parametrize("first, second", [(3, 2), (2, 3)])
async def test_memory_cache_keeps_only_the_newest_version(first, second):
    cache = MemoryWindowCache()
    now = dt.datetime.now(dt.UTC)
    windows = {n: Window([Message(n, Role.USER, str(n), "", 1, now)], n, False) for n in (2, 3)}
    await cache.fill(T, S, 10, windows[first])
    await cache.fill(T, S, 10, windows[second])
    assert await cache.get(T, S, 10) == windows[3]
    await cache.invalidate(T, S, 4)
    assert await cache.get(T, S, 10) is None
    await cache.fill(T, S, 10, windows[3])
    assert await cache.get(T, S, 10) is None


async def test_memory_cache_drops_the_least_recently_used_session():
    cache = MemoryWindowCache(max_sessions=2)
    now = dt.datetime.now(dt.UTC)
    window = Window([Message(1, Role.USER, "x", "", 1, now)], 1, False)
    for session_id in ("a", "b"):
        await cache.fill(T, session_id, 10, window)
    await cache.get(T, "a", 10)
    await cache.fill(T, "c", 10, window)
    assert await cache.get(T, "b", 10) is None
    assert await cache.get(T, "a", 10) == window


async def test_a_read_older_than_a_lost_invalidation_does_not_fill_the_cache():
    store, fake, cache = make(retry_s=0)
    await store.append(T, S, [user("a")])
    hold = fake.hold = asyncio.Event()
    slow_read = asyncio.create_task(store.window(T, S, 10))
    await fake.read_done.wait()
    fake.hold = None
    cache.down = True
    await store.append(T, S, [user("b")])
    cache.down = False
    hold.set()
    assert contents(await slow_read) == ["a"]
    assert contents(await store.window(T, S, 10)) == ["a", "b"]
