"""Result cache for repeated texts: in-process LRU, or Redis shared by every embedder replica.

Keys are the text the model sees (after the character cap); values are the raw vector and the
untruncated token count, so normalisation and the truncation flag still follow each request.
Redis errors count as misses: losing the cache costs encode time, never an answer.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions

from services.embedder.domain import Vector

logger = logging.getLogger(__name__)

_TOKENS = struct.Struct("<I")


@dataclass(frozen=True)
class Cached:
    vector: Vector
    # Tokens of the text without truncation, special tokens included.
    tokens: int


class ResultCache(Protocol):
    async def get_many(self, texts: Sequence[str]) -> list[Cached | None]: ...

    async def put_many(self, entries: Sequence[tuple[str, Cached]]) -> None: ...

    async def close(self) -> None: ...


class LruCache:
    """The `max_entries` most recently used results, in this process."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}: must be >= 1")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, Cached] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, texts: Sequence[str]) -> list[Cached | None]:
        found: list[Cached | None] = []
        for text in texts:
            entry = self._entries.get(text)
            if entry is not None:
                self._entries.move_to_end(text)
            found.append(entry)
        return found

    async def put_many(self, entries: Sequence[tuple[str, Cached]]) -> None:
        for text, entry in entries:
            self._entries[text] = entry
            self._entries.move_to_end(text)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisCache:
    """Results in Redis under `<prefix><sha256 of the text>`, expiring after `ttl_s`."""

    def __init__(self, url: str, *, prefix: str, ttl_s: int, timeout_s: float = 0.5) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        # A short timeout: a slow Redis must not cost more than encoding would.
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def key(self, text: str) -> str:
        return self.prefix + hashlib.sha256(text.encode("utf-8")).hexdigest()

    async def get_many(self, texts: Sequence[str]) -> list[Cached | None]:
        try:
            values = await self._redis.mget([self.key(t) for t in texts])
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("result cache unreachable, encoding instead: %s", type(exc).__name__)
            return [None] * len(texts)
        return [None if v is None else _decode(v) for v in values]

    async def put_many(self, entries: Sequence[tuple[str, Cached]]) -> None:
        if not entries:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for text, entry in entries:
                    pipe.set(self.key(text), _encode(entry), ex=self.ttl_s)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("result cache unreachable, result not stored: %s", type(exc).__name__)

    async def close(self) -> None:
        await self._redis.aclose()


def _encode(entry: Cached) -> bytes:
    return _TOKENS.pack(entry.tokens) + np.asarray(entry.vector, dtype="<f4").tobytes()


def _decode(value: bytes | str) -> Cached | None:
    # A str comes back only from a client told to decode responses: not a value of ours.
    if isinstance(value, str) or len(value) < _TOKENS.size or (len(value) - _TOKENS.size) % 4:
        # Not ours (or cut short): a miss, and the next put overwrites it.
        return None
    (tokens,) = _TOKENS.unpack_from(value)
    vector = np.frombuffer(value, dtype="<f4", offset=_TOKENS.size).astype(np.float32)
    return Cached(vector, tokens)


class HitCounter:
    """Lookups and hits since start, for load reports."""

    def __init__(self) -> None:
        self.lookups = 0
        self.hits = 0

    def add(self, lookups: int, hits: int) -> None:
        self.lookups += lookups
        self.hits += hits

    @property
    def ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def create_cache(*, max_entries: int, redis_url: str, prefix: str, ttl_s: int) -> ResultCache | None:
    """Redis when a URL is given, else an LRU of `max_entries`, else (0) no cache."""
    if redis_url:
        return RedisCache(redis_url, prefix=prefix, ttl_s=ttl_s)
    if max_entries:
        return LruCache(max_entries)
    return None
