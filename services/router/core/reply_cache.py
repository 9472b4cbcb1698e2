"""Replies of deterministic requests (greedy, or seeded), kept so that under overload an
exact repeat is answered without a worker: the same request would produce the same tokens.

Pure: a key is a digest of the worker request less what does not decide the reply (its id,
its priority); entries are evicted least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, replace

from services.router.core.domain import FinishReason, WorkerRequest


def reply_key(request: WorkerRequest) -> str:
    """Digest of everything that decides the reply. The request is a frozen value of plain
    fields (strings, numbers, enums, tuples), so its repr is a stable serialisation."""
    keyed = replace(request, request_id="", priority=0)
    return hashlib.sha256(repr(keyed).encode()).hexdigest()


@dataclass(frozen=True)
class CachedReply:
    model: str
    text: str
    token_ids: tuple[int, ...]
    finish: FinishReason
    prompt_tokens: int
    completion_tokens: int


class ReplyCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries={max_entries}: must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedReply] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> CachedReply | None:
        reply = self._entries.get(key)
        if reply is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return reply

    def put(self, key: str, reply: CachedReply) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = reply
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
