"""A paged key/value cache shared by every sequence, and the attention that reads it.

Positions live in fixed-size blocks; a sequence's block table says which. The
scheduler's block manager decides the tables; this module only moves tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from services.worker.model.args import ModelArgs
from services.worker.model.llama import attention, chunk_mask


class PagedKVCache:
    """Keys and values of `num_blocks` blocks of `block_size` positions, for every layer."""

    def __init__(
        self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        # One flat slot axis (block * block_size + offset): writes and gathers are single index ops.
        shape = (args.num_layers, num_blocks * block_size, args.num_kv_heads, args.head_dim)
        # torch.empty: a slot is always written before any sequence reads it.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2

    @staticmethod
    def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        per_position = args.num_layers * args.num_kv_heads * args.head_dim * 2
        return per_position * block_size * torch.empty((), dtype=dtype).element_size()

    def slots(self, block_table: Sequence[int], end: int) -> torch.Tensor:
        """Cache slots of positions 0..end-1 of a sequence with this block table."""
        table = torch.tensor(block_table, dtype=torch.long)
        positions = torch.arange(end)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device)


@dataclasses.dataclass
class PagedSpan:
    """One sequence's chunk inside a flattened batch."""

    # Token range of the chunk in the batch.
    begin: int
    end: int
    # Slots of every position the chunk attends to (cached ones and its own).
    read_slots: torch.Tensor
    mask: torch.Tensor | None


@dataclasses.dataclass
class PagedForwardContext:
    """Several sequences' chunks as one flattened batch: shared matmuls, attention per sequence."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: PagedKVCache
    # Cache slot of every token of the batch.
    write_slots: torch.Tensor
    spans: list[PagedSpan]

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        chunks: Sequence[tuple[int, int, Sequence[int]]],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> PagedForwardContext:
        """`chunks`: (start position, length, block table) of each sequence, in batch order."""
        spans, writes, begin = [], [], 0
        for start, length, table in chunks:
            slots = cache.slots(table, start + length)
            writes.append(slots[start:])
            mask = chunk_mask(length, start, cache.device)
            spans.append(PagedSpan(begin, begin + length, slots, mask))
            begin += length
        return cls(rope[0], rope[1], cache, torch.cat(writes), spans)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        # index_copy_/index_select: far quicker on CPU than the general advanced-indexing kernels.
        k_cache.index_copy_(0, self.write_slots, k[0].transpose(0, 1))
        v_cache.index_copy_(0, self.write_slots, v[0].transpose(0, 1))
        outs = []
        for span in self.spans:
            keys = k_cache.index_select(0, span.read_slots).transpose(0, 1).unsqueeze(0)
            values = v_cache.index_select(0, span.read_slots).transpose(0, 1).unsqueeze(0)
            outs.append(attention(q[:, :, span.begin : span.end], keys, values, span.mask))
        return torch.cat(outs, dim=2)
