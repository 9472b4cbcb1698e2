"""WindowCache on Redis: one hash per session (version + one field per token budget), with a TTL.

Version checks run as Lua scripts so a check and its write are one atomic step.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.session.cache import CacheUnavailable
from services.session.crypto import DecryptError, KeyRing
from services.session.metrics import BACKEND_ERRORS
from services.session.model import Message, Role, Window

VERSION_FIELD = "v"

# KEYS[1] session hash; ARGV: version, field, payload, ttl ms.
_FILL = """
local v = redis.call('HGET', KEYS[1], 'v')
local new = tonumber(ARGV[1])
if v and tonumber(v) > new then return 0 end
if (not v) or tonumber(v) < new then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] session hash; ARGV: version, ttl ms.
_INVALIDATE = """
local v = redis.call('HGET', KEYS[1], 'v')
if v and tonumber(v) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def encode_window(window: Window) -> bytes:
    return json.dumps(
        {
            "l": window.last_seq,
            "t": window.truncated,
            "m": [
                [m.seq, int(m.role), m.content, m.client_msg_id, m.token_count, m.created_at.isoformat()]
                for m in window.messages
            ],
        },
        separators=(",", ":"),
    ).encode()


def decode_window(payload: bytes) -> Window:
    doc = json.loads(payload)
    messages = [
        Message(seq, Role(role), content, client_msg_id, tokens, dt.datetime.fromisoformat(created))
        for seq, role, content, client_msg_id, tokens, created in doc["m"]
    ]
    return Window(messages, doc["l"], doc["t"])


class RedisWindowCache:
    """Implements `services.session.cache.WindowCache`; every call is bounded by `timeout_s`.

    With a key ring, payloads are sealed like the database rows, bound to their key and field.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "infermesh:session",
        ttl_s: float = 300.0,
        timeout_s: float = 0.25,
        keys: KeyRing | None = None,
    ) -> None:
        # No client-side retries: a failure falls back to the database at once.
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._keys = keys
        self._fill = self.client.register_script(_FILL)
        self._invalidate = self.client.register_script(_INVALIDATE)

    def key(self, tenant: str, session_id: str) -> str:
        # The tenant's length keeps "a:b" + "c" apart from "a" + "b:c".
        return f"{self.prefix}:w:{len(tenant)}:{tenant}:{session_id}"

    @asynccontextmanager
    async def _call(self, calls: int = 2) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout_s * calls):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            BACKEND_ERRORS.labels("redis", type(exc).__name__).inc()
            raise CacheUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def get(self, tenant: str, session_id: str, token_budget: int) -> Window | None:
        key, field = self.key(tenant, session_id), f"b:{token_budget}"
        async with self._call():
            payload = await self.client.hget(key, field)  # type: ignore[misc]
        if payload is None:
            return None
        if self._keys is not None:
            try:
                payload = self._keys.open_blob(payload, f"{key}|{field}".encode())
            except DecryptError as exc:
                # E.g. sealed with a key since dropped from the ring: a miss, the database has it.
                raise CacheUnavailable(str(exc)) from exc
        return decode_window(payload)

    async def fill(self, tenant: str, session_id: str, token_budget: int, window: Window) -> None:
        key, field = self.key(tenant, session_id), f"b:{token_budget}"
        payload = encode_window(window)
        if self._keys is not None:
            payload = self._keys.seal_blob(payload, f"{key}|{field}".encode())
        async with self._call():
            await self._fill(keys=[key], args=[window.last_seq, field, payload, self._ttl_ms])

    async def invalidate(self, tenant: str, session_id: str, version: int) -> None:
        async with self._call():
            await self._invalidate(keys=[self.key(tenant, session_id)], args=[version, self._ttl_ms])

    async def clear(self) -> None:
        async with self._call(calls=100):
            batch: list[Any] = []
            async for key in self.client.scan_iter(match=f"{self.prefix}:w:*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    await self.client.unlink(*batch)
                    batch = []
            if batch:
                await self.client.unlink(*batch)

    async def close(self) -> None:
        await self.client.aclose()
