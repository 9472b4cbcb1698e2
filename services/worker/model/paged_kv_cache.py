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
        # Heads before slots: a gather then comes out in the [heads, positions, head_dim] layout
        # attention reads, with no transpose copy (worth several times the gather itself).
        shape = (args.num_layers, args.num_kv_heads, num_blocks * block_size, args.head_dim)
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
    # Slots of every position the chunk attends to (cached ones and its own); None for a decode,
    # which attends through the batch's `DecodeGroup` instead.
    read_slots: torch.Tensor | None
    mask: torch.Tensor | None


@dataclasses.dataclass
class DecodeGroup:
    """Every one-token chunk of a batch, attended together in one padded call.

    One attention call per decoding sequence costs more in call overhead than in
    arithmetic; padding every sequence's keys to the longest and masking the pad
    turns them into a single call whatever the batch size.
    """

    # Batch rows of the decode tokens.
    rows: torch.Tensor
    # [n * max_len] cache slots, row-major by sequence; padding points at slot 0.
    read_slots: torch.Tensor
    # [1, n, 1, max_len]: True where a sequence has no position (padding).
    pad: torch.Tensor
    max_len: int

    @classmethod
    def build(
        cls, cache: PagedKVCache, rows: Sequence[int], decodes: Sequence[tuple[int, Sequence[int]]]
    ) -> DecodeGroup:
        """`decodes`: (position of the token, block table) of each decoding sequence."""
        lengths = torch.tensor([start + 1 for start, _ in decodes])
        max_len = int(lengths.max())
        width = -(-max_len // cache.block_size)
        tables = torch.zeros(len(decodes), width, dtype=torch.long)
        for i, (_, table) in enumerate(decodes):
            used = table[:width]
            tables[i, : len(used)] = torch.tensor(used, dtype=torch.long)
        positions = torch.arange(max_len)
        mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
        slots = tables[:, positions // cache.block_size] * cache.block_size + positions % cache.block_size
        slots = torch.where(mask, slots, 0)
        return cls(
            rows=torch.tensor(rows, dtype=torch.long, device=cache.device),
            read_slots=slots.flatten().to(cache.device),
            pad=(~mask).view(1, len(decodes), 1, max_len).to(cache.device),
            max_len=max_len,
        )

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [1, heads, T, head_dim] of the whole batch; the decode rows' outputs [1, heads, n, head_dim].

        Written out rather than through scaled_dot_product_attention: with one query per
        sequence its CPU kernels run many times slower than two batched matmuls here.
        """
        n, max_len = len(self.rows), self.max_len
        kv_heads, head_dim = k_cache.shape[0], k_cache.shape[2]
        group = q.shape[1] // kv_heads
        # [kv_heads, n, group, head_dim]: the query heads that share a key head sit together.
        queries = q[0].index_select(1, self.rows).view(kv_heads, group, n, head_dim).transpose(1, 2)
        keys = k_cache.index_select(1, self.read_slots).view(kv_heads, n, max_len, head_dim)
        values = v_cache.index_select(1, self.read_slots).view(kv_heads, n, max_len, head_dim)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * head_dim**-0.5
        scores.masked_fill_(self.pad, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [kv_heads, n, group, head_dim]
        return out.transpose(1, 2).reshape(1, kv_heads * group, n, head_dim)


@dataclasses.dataclass
class PagedForwardContext:
    """Several sequences' chunks as one flattened batch: shared matmuls, one attention call for
    all the decodes and one per prompt chunk."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: PagedKVCache
    # Cache slot of every token of the batch.
    write_slots: torch.Tensor
    spans: list[PagedSpan]
    decodes: DecodeGroup | None = None

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        chunks: Sequence[tuple[int, int, Sequence[int]]],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> PagedForwardContext:
        """`chunks`: (start position, length, block table) of each sequence, in batch order."""
        spans, writes, begin = [], [], 0
        decode_rows: list[int] = []
        decodes: list[tuple[int, Sequence[int]]] = []
        for start, length, table in chunks:
            if length == 1:
                block, offset = divmod(start, cache.block_size)
                writes.append(torch.tensor([table[block] * cache.block_size + offset]))
                spans.append(PagedSpan(begin, begin + 1, None, None))
                decode_rows.append(begin)
                decodes.append((start, table))
            else:
                slots = cache.slots(table, start + length)
                writes.append(slots[start:].cpu())
                spans.append(PagedSpan(begin, begin + length, slots, chunk_mask(length, start, cache.device)))
            begin += length
        group = DecodeGroup.build(cache, decode_rows, decodes) if decodes else None
        return cls(rope[0], rope[1], cache, torch.cat(writes).to(cache.device), spans, group)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        # index_copy_/index_select: far quicker on CPU than the general advanced-indexing kernels.
        k_cache.index_copy_(1, self.write_slots, k[0])
        v_cache.index_copy_(1, self.write_slots, v[0])
        if self.decodes is not None and len(self.decodes.rows) == q.shape[2]:
            return self.decodes.attend(q, k_cache, v_cache)
        out = torch.empty_like(q)
        for span in self.spans:
            if span.read_slots is None:
                continue
            keys = k_cache.index_select(1, span.read_slots).unsqueeze(0)
            values = v_cache.index_select(1, span.read_slots).unsqueeze(0)
            out[:, :, span.begin : span.end] = attention(
                q[:, :, span.begin : span.end], keys, values, span.mask
            )
        if self.decodes is not None:
            out.index_copy_(2, self.decodes.rows, self.decodes.attend(q, k_cache, v_cache))
        return out
