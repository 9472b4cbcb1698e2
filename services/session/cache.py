"""Window cache in front of the store: filled after commit, invalidated on every write.

The cache is an optimisation only. Each session's entries carry a version (the
session's last_seq when written); a write bumps the version after it commits,
which drops older entries and makes late fills from older reads lose. Any cache
failure falls back to the store and is counted, never surfaced.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from services.session.model import (
    AppendResult,
    EraseResult,
    HistoryPage,
    NewMessage,
    NewSession,
    SessionExport,
    SessionInfo,
    Window,
)
from services.session.store import Store

logger = logging.getLogger(__name__)

# Version of a deleted session: no fill from a read that started before the delete can win.
TOMBSTONE = (1 << 63) - 1

CACHE_EVENTS = Counter(
    "infermesh_session_window_cache_events_total",
    "Window cache lookups and failures by outcome.",
    ["event"],
)


class CacheUnavailable(Exception):
    """The cache backend failed; the caller falls back to the store."""


class WindowCache(Protocol):
    """Windows by (tenant, session, token budget), versioned by the session's last_seq."""

    async def get(self, tenant: str, session_id: str, token_budget: int) -> Window | None: ...

    async def fill(self, tenant: str, session_id: str, token_budget: int, window: Window) -> None:
        """Store `window` unless the session's entries already carry a newer version."""
        ...

    async def invalidate(self, tenant: str, session_id: str, version: int) -> None:
        """Drop the session's entries older than `version` and remember `version`."""
        ...

    async def clear(self) -> None:
        """Drop every entry (after writes whose invalidation may have been lost)."""
        ...

    async def close(self) -> None: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    # Cache calls that failed and fell back to the store.
    errors: int = 0
    # Lookups that skipped the cache because it failed recently.
    bypassed: int = 0

    def count(self, event: str) -> None:
        setattr(self, event, getattr(self, event) + 1)
        CACHE_EVENTS.labels(event).inc()

    @property
    def hit_ratio(self) -> float:
        lookups = self.hits + self.misses + self.bypassed
        return self.hits / lookups if lookups else 0.0


_Entry = tuple[int, dict[int, Window], float]


class MemoryWindowCache:
    """In-process WindowCache for the embedded mode: LRU by session, entries expire like Redis's."""

    def __init__(self, max_sessions: int = 10_000, ttl_s: float = 300.0) -> None:
        self._max = max_sessions
        self._ttl_s = ttl_s
        # (tenant, session_id) -> (version, {token_budget: window}, expires at)
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()

    def _live(self, key: tuple[str, str]) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry[2] <= time.monotonic():
            del self._entries[key]
            return None
        return entry

    async def get(self, tenant: str, session_id: str, token_budget: int) -> Window | None:
        entry = self._live((tenant, session_id))
        if entry is None:
            return None
        self._entries.move_to_end((tenant, session_id))
        return entry[1].get(token_budget)

    async def fill(self, tenant: str, session_id: str, token_budget: int, window: Window) -> None:
        key = (tenant, session_id)
        entry = self._live(key)
        if entry is None or entry[0] < window.last_seq:
            entry = (window.last_seq, {}, 0.0)
        elif entry[0] > window.last_seq:
            return
        entry[1][token_budget] = window
        self._put(key, entry[0], entry[1])

    async def invalidate(self, tenant: str, session_id: str, version: int) -> None:
        key = (tenant, session_id)
        entry = self._live(key)
        if entry is None or entry[0] < version:
            self._put(key, version, {})

    def _put(self, key: tuple[str, str], version: int, windows: dict[int, Window]) -> None:
        self._entries[key] = (version, windows, time.monotonic() + self._ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def clear(self) -> None:
        self._entries.clear()

    async def close(self) -> None:
        self._entries.clear()


class CachedStore:
    """A Store whose windows come from a WindowCache when it has them.

    After a cache failure the cache is skipped for `retry_s`. A write whose
    invalidation failed leaves entries that may be stale, so the cache is
    cleared before it is used again, and reads that started before such a write
    do not fill it (the epoch counter).
    """

    def __init__(self, store: Store, cache: WindowCache, *, retry_s: float = 1.0) -> None:
        self.store = store
        self.cache = cache
        self.stats = CacheStats()
        self._retry_s = retry_s
        self._down_until = 0.0
        self._dirty = False
        self._epoch = 0
        self._recovering = asyncio.Lock()

    # --- cache plumbing ------------------------------------------------------

    def _failed(self, exc: BaseException, *, lost_invalidation: bool = False) -> None:
        self.stats.count("errors")
        if lost_invalidation:
            self._dirty = True
            self._epoch += 1
        if time.monotonic() >= self._down_until:
            logger.warning("window cache unavailable, serving from the database: %s", exc)
        self._down_until = time.monotonic() + self._retry_s

    async def _usable(self) -> bool:
        if time.monotonic() < self._down_until:
            return False
        if not self._dirty:
            return True
        async with self._recovering:
            if self._dirty:
                try:
                    await self.cache.clear()
                except CacheUnavailable as exc:
                    self._failed(exc)
                    return False
                self._dirty = False
                logger.info("window cache cleared after lost invalidations")
        return True

    async def _invalidate(self, tenant: str, session_id: str, version: int) -> None:
        # Bump the epoch even when the cache is skipped: its entries may be stale now.
        if not await self._usable():
            self._dirty = True
            self._epoch += 1
            return
        try:
            await self.cache.invalidate(tenant, session_id, version)
        except CacheUnavailable as exc:
            self._failed(exc, lost_invalidation=True)

    # --- Store ---------------------------------------------------------------

    async def window(self, tenant: str, session_id: str, token_budget: int) -> Window:
        if not await self._usable():
            self.stats.count("bypassed")
            return await self.store.window(tenant, session_id, token_budget)
        try:
            cached = await self.cache.get(tenant, session_id, token_budget)
        except CacheUnavailable as exc:
            self._failed(exc)
            return await self.store.window(tenant, session_id, token_budget)
        if cached is not None:
            self.stats.count("hits")
            return cached
        self.stats.count("misses")
        epoch = self._epoch
        window = await self.store.window(tenant, session_id, token_budget)
        if epoch == self._epoch and await self._usable():
            try:
                await self.cache.fill(tenant, session_id, token_budget, window)
            except CacheUnavailable as exc:
                self._failed(exc)
        return window

    async def append(
        self,
        tenant: str,
        session_id: str,
        messages: Sequence[NewMessage],
        expected_last_seq: int | None = None,
    ) -> AppendResult:
        result = await self.store.append(tenant, session_id, messages, expected_last_seq)
        await self._invalidate(tenant, session_id, result.last_seq)
        return result

    async def delete_session(self, tenant: str, session_id: str) -> None:
        await self.store.delete_session(tenant, session_id)
        await self._invalidate(tenant, session_id, TOMBSTONE)

    async def erase_user(self, tenant: str, user_id: str) -> EraseResult:
        result = await self.store.erase_user(tenant, user_id)
        for session_id in result.session_ids:
            await self._invalidate(tenant, session_id, TOMBSTONE)
        return result

    async def purge_expired(
        self, now: dt.datetime | None = None, batch_size: int = 500
    ) -> list[tuple[str, str]]:
        purged = await self.store.purge_expired(now, batch_size)
        for tenant, session_id in purged:
            await self._invalidate(tenant, session_id, TOMBSTONE)
        return purged

    async def ping(self) -> None:
        await self.store.ping()

    async def create_session(self, new: NewSession) -> SessionInfo:
        return await self.store.create_session(new)

    async def get_session(self, tenant: str, session_id: str) -> SessionInfo:
        return await self.store.get_session(tenant, session_id)

    async def history(self, tenant: str, session_id: str, after_seq: int, limit: int) -> HistoryPage:
        return await self.store.history(tenant, session_id, after_seq, limit)

    def export_user(self, tenant: str, user_id: str) -> AsyncIterator[SessionExport]:
        return self.store.export_user(tenant, user_id)

    async def close(self) -> None:
        stats = self.stats
        logger.info(
            "window cache stats",
            extra={
                "hits": stats.hits,
                "misses": stats.misses,
                "errors": stats.errors,
                "bypassed": stats.bypassed,
                "hit_ratio": round(stats.hit_ratio, 4),
            },
        )
        try:
            await self.cache.close()
        finally:
            await self.store.close()
