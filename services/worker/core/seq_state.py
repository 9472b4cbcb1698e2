"""What the scheduler knows about one sequence: its tokens, how far they are computed, its blocks."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from services.worker.core.block_manager import BlockHash, hash_block

# Priorities are the common Priority numbers: 1 critical, 2 interactive, 3 standard, 4 batch.
STANDARD_PRIORITY = 3
LOWEST_PRIORITY = 4


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclasses.dataclass(eq=False)
class SeqState:
    request_id: str
    # Prompt (resumed tokens included) first, then every token generated here.
    token_ids: list[int]
    num_prompt_tokens: int
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    # Positions whose keys and values sit in the cache: the model runs from here next.
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    # Chained hashes of every full block of token_ids, extended as tokens arrive.
    block_hashes: list[BlockHash] = dataclasses.field(default_factory=list)
    # Leading blocks of block_table already offered to the prefix cache.
    num_registered_blocks: int = 0
    # Tokens found in the prefix cache when the sequence was last admitted.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Lower runs first: 1 critical, 2 interactive, 3 standard, 4 batch (the common Priority numbers).
    priority: int = STANDARD_PRIORITY
    # Tells a sequence from a later one that reuses its request id.
    serial: int = 0

    @classmethod
    def new(
        cls,
        request_id: str,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        priority: int = STANDARD_PRIORITY,
    ) -> SeqState:
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_new_tokens={max_new_tokens}: must be >= 1")
        return cls(
            request_id=request_id,
            token_ids=list(prompt_ids),
            num_prompt_tokens=len(prompt_ids),
            max_new_tokens=max_new_tokens,
            stop_token_ids=frozenset(stop_token_ids),
            priority=priority,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def max_positions(self) -> int:
        """Cache positions the sequence can ever need: the last sampled token is never fed back."""
        return self.num_prompt_tokens + self.max_new_tokens - 1

    def extend_hashes(self, block_size: int) -> None:
        parent = self.block_hashes[-1] if self.block_hashes else None
        for start in range(len(self.block_hashes) * block_size, self.num_tokens - block_size + 1, block_size):
            parent = hash_block(parent, self.token_ids[start : start + block_size])
            self.block_hashes.append(parent)
