"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

A block holds the keys and values of `block_size` consecutive positions of one
or more sequences. Full blocks are named by a hash chained over every token up
to their end, so two sequences that share a prefix share its blocks. Blocks
nobody uses stay cached until the space is needed, least recently freed first.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Name of a full block: its tokens and, through `parent`, every token before them.

    A cryptographic digest rather than Python's `hash`: a collision would hand one
    conversation another's keys and values, and 128 bits make that impossible in practice.
    """
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array.array("q", token_ids).tobytes())
    return h.digest()


@dataclasses.dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full and registered in the prefix cache.
    hash: BlockHash | None = None


class BlockManager:
    """Hands out blocks, shares cached ones and takes them back.

    Free blocks wait in least-recently-freed order; a free block that still holds
    a cached prefix can be revived by a hit until allocation reuses its space.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the first key is reused first.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_hit_rate(self) -> float:
        """Share of looked-up prompt tokens found in the cache."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Longest run of leading blocks already cached; takes no reference."""
        found: list[int] = []
        if not self.enable_prefix_caching:
            return found
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def can_allocate(self, cached: Sequence[int], num_new: int) -> bool:
        """Whether `num_new` fresh blocks fit once the cached hits in `cached` are taken."""
        # A hit on a free cached block takes that block off the free list too.
        revived = sum(1 for block_id in cached if self.blocks[block_id].ref_count == 0)
        return num_new + revived <= len(self._free)

    def take_cached(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def allocate(self, num_new: int) -> list[int]:
        """`num_new` fresh blocks; evicts the least recently freed cached ones as needed."""
        if num_new > len(self._free):
            raise RuntimeError(f"asked for {num_new} blocks, {len(self._free)} free")
        ids: list[int] = []
        for _ in range(num_new):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free."""
        # The tail of a sequence is the least likely to be shared again: free it first so it is evicted first.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    # Nothing cached in it: reuse it before blocks that may still score a hit.
                    self._free.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash (first writer wins)."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.hash is not None or block_hash in self._cached:
            return
        block.hash = block_hash
        self._cached[block_hash] = block_id
