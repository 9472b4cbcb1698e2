"""A paged key/value cache shared by every sequence, and the attention that reads it.

Positions live in fixed-size blocks; a sequence's block table says which. The
scheduler's block manager decides the tables; this module only moves tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from services.worker.model import paged_attention_cpu
from services.worker.model.args import ModelArgs
from services.worker.model.kernels import Kernel
from services.worker.model.llama import attention, chunk_mask


class PagedKVCache:
    """Keys and values of `num_blocks` blocks of `block_size` positions, for every layer."""

    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        decode_kernel: bool | None = None,
    ) -> None:
        """`decode_kernel`: attend decodes with the C++ kernel of `paged_attention_cpu` (None:
        wherever it runs, i.e. float32 on CPU with a compiler), else in torch ops."""
        # One flat slot axis (block * block_size + offset): writes and gathers are single index ops.
        # Heads before slots: a gather then comes out in the [heads, positions, head_dim] layout
        # attention reads, with no transpose copy (worth several times the gather itself).
        shape = (args.num_layers, args.num_kv_heads, num_blocks * block_size, args.head_dim)
        # Zeros, not torch.empty: decode groups read whole blocks and pad to their longest
        # sequence, so slots never written are read too (then weighted by exactly 0). Garbage
        # there could be NaN or inf, and 0 * NaN poisons the sum.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.decode_kernel = (
            paged_attention_cpu.available(dtype, device) if decode_kernel is None else decode_kernel
        )

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


def padded_tables(decodes: Sequence[tuple[int, Sequence[int]]], block_size: int) -> tuple[list[int], int]:
    """The blocks each decode (position, block table) reads, row-major, each row padded with
    block 0 to the longest: (flat blocks, width)."""
    width = max(start // block_size + 1 for start, _ in decodes)
    blocks: list[int] = []
    for start, table in decodes:
        used = list(table[: start // block_size + 1])
        blocks += used + [0] * (width - len(used))
    return blocks, width


@dataclasses.dataclass
class DecodeGroup:
    """One-token chunks of a batch with similar lengths, attended together in one padded call.

    One attention call per decoding sequence costs more in call overhead than in arithmetic;
    padding a group's keys to its longest sequence turns them into one call. Sequences are
    grouped by length (block counts within a factor of two), so a short one does not read
    and multiply the padding of the longest in the batch.
    """

    # Batch rows of the decode tokens.
    rows: torch.Tensor
    # [n * width] cache blocks, row-major by sequence; padding points at block 0.
    read_blocks: torch.Tensor
    # [1, n, 1, width * block_size]: True where a sequence has no position (padding).
    pad: torch.Tensor
    width: int

    @classmethod
    def build(
        cls, cache: PagedKVCache, rows: Sequence[int], decodes: Sequence[tuple[int, Sequence[int]]]
    ) -> DecodeGroup:
        """`decodes`: (position of the token, block table) of each decoding sequence."""
        size = cache.block_size
        blocks, width = padded_tables(decodes, size)
        lengths = torch.tensor([start + 1 for start, _ in decodes])
        pad = torch.arange(width * size).unsqueeze(0) >= lengths.unsqueeze(1)
        return cls(
            rows=torch.tensor(rows, dtype=torch.long, device=cache.device),
            read_blocks=torch.tensor(blocks, dtype=torch.long, device=cache.device),
            pad=pad.view(1, len(decodes), 1, width * size).to(cache.device),
            width=width,
        )

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [1, heads, T, head_dim] of the whole batch; the group's outputs [1, heads, n, head_dim].

        Written out rather than through scaled_dot_product_attention: with one query per
        sequence its CPU kernels run many times slower than two batched matmuls here. Keys are
        gathered a block at a time (one index per block, not per position).
        """
        n = len(self.rows)
        kv_heads, slots, head_dim = k_cache.shape
        group = q.shape[1] // kv_heads
        length = self.pad.shape[-1]
        # [kv_heads, n, group, head_dim]: the query heads that share a key head sit together.
        queries = q[0].index_select(1, self.rows)
        queries = queries.view(kv_heads, group, n, head_dim).transpose(1, 2)
        by_block = (kv_heads, slots // (length // self.width), length // self.width, head_dim)
        keys = k_cache.view(by_block).index_select(1, self.read_blocks).view(kv_heads, n, length, head_dim)
        values = v_cache.view(by_block).index_select(1, self.read_blocks).view(kv_heads, n, length, head_dim)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * head_dim**-0.5
        scores.masked_fill_(self.pad, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # [kv_heads, n, group, head_dim]
        return out.transpose(1, 2).reshape(1, kv_heads * group, n, head_dim)


@dataclasses.dataclass
class DecodeBatch:
    """Every one-token chunk of a batch, attended in one call of the paged-cache kernel: each
    sequence reads its own positions through its block table, so nothing is padded or gathered."""

    rows: torch.Tensor
    # [n, width] block tables (padded with block 0, never read) and [n] positions attended.
    tables: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def build(
        cls, cache: PagedKVCache, rows: Sequence[int], decodes: Sequence[tuple[int, Sequence[int]]]
    ) -> DecodeBatch:
        tables, width = padded_tables(decodes, cache.block_size)
        return cls(
            rows=torch.tensor(rows, dtype=torch.long, device=cache.device),
            tables=torch.tensor(tables, dtype=torch.long, device=cache.device).view(len(decodes), width),
            lengths=torch.tensor([start + 1 for start, _ in decodes], dtype=torch.long, device=cache.device),
        )

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int
    ) -> torch.Tensor:
        """q [1, heads, T, head_dim] of the whole batch; the decodes' outputs [1, heads, n, head_dim]."""
        queries = q[0].index_select(1, self.rows).transpose(0, 1).contiguous()
        out = paged_attention_cpu.decode_attention(
            queries, k_cache, v_cache, self.tables, self.lengths, block_size
        )
        return out.transpose(0, 1).unsqueeze(0)


def length_groups(block_counts: Sequence[int], min_group: int = 4) -> list[list[int]]:
    """Indices of the decodes grouped by block count within a factor of two (short first); a
    group of fewer than `min_group` joins the next longer one (a call per group has a cost)."""
    buckets: dict[int, list[int]] = {}
    for i, count in enumerate(block_counts):
        buckets.setdefault(max(count - 1, 0).bit_length(), []).append(i)
    groups: list[list[int]] = []
    carry: list[int] = []
    for key in sorted(buckets):
        carry += buckets[key]
        if len(carry) >= min_group:
            groups.append(carry)
            carry = []
    if carry:
        if groups:
            groups[-1] += carry
        else:
            groups.append(carry)
    # Batch order within a group: a group of every decode is then the batch's own order.
    return [sorted(g) for g in groups]


@dataclasses.dataclass
class PagedForwardContext:
    """Several sequences' chunks as one flattened batch: shared matmuls, one attention call per
    group of decodes of similar length and one per prompt chunk."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: PagedKVCache
    # Cache slot of every token of the batch.
    write_slots: torch.Tensor
    spans: list[PagedSpan]
    decodes: list[DecodeGroup] = dataclasses.field(default_factory=list)
    kernel: Kernel | None = None
    # All decodes at once where the cache has the decode kernel (then `decodes` is empty).
    decode_batch: DecodeBatch | None = None

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        chunks: Sequence[tuple[int, int, Sequence[int]]],
        rope: tuple[torch.Tensor, torch.Tensor],
        kernel: Kernel | None = None,
    ) -> PagedForwardContext:
        """`chunks`: (start position, length, block table) of each sequence, in batch order."""
        size = cache.block_size
        spans: list[PagedSpan] = []
        # Plain lists, one tensor each at the end: a tensor per sequence costs more than its data.
        writes: list[int] = []
        decode_rows: list[int] = []
        decodes: list[tuple[int, Sequence[int]]] = []
        begin = 0
        for start, length, table in chunks:
            if length == 1:
                writes.append(table[start // size] * size + start % size)
                spans.append(PagedSpan(begin, begin + 1, None, None))
                decode_rows.append(begin)
                decodes.append((start, table))
            else:
                slots = cache.slots(table, start + length)
                writes += slots[start:].tolist()
                spans.append(PagedSpan(begin, begin + length, slots, chunk_mask(length, start, cache.device)))
            begin += length
        write_slots = torch.tensor(writes, dtype=torch.long, device=cache.device)
        if cache.decode_kernel and decodes:
            batch = DecodeBatch.build(cache, decode_rows, decodes)
            return cls(rope[0], rope[1], cache, write_slots, spans, [], kernel, batch)
        groups = [
            DecodeGroup.build(cache, [decode_rows[i] for i in g], [decodes[i] for i in g])
            for g in length_groups([start // size + 1 for start, _ in decodes])
        ]
        return cls(rope[0], rope[1], cache, write_slots, spans, groups, kernel)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        # index_copy_/index_select: far quicker on CPU than the general advanced-indexing kernels.
        k_cache.index_copy_(1, self.write_slots, k[0])
        v_cache.index_copy_(1, self.write_slots, v[0])
        batch = self.decode_batch
        if batch is not None and len(batch.rows) == q.shape[2]:
            return batch.attend(q, k_cache, v_cache, self.cache.block_size)
        if len(self.decodes) == 1 and len(self.decodes[0].rows) == q.shape[2]:
            return self.decodes[0].attend(q, k_cache, v_cache)
        out = torch.empty_like(q)
        for span in self.spans:
            if span.read_slots is None:
                continue
            keys = k_cache.index_select(1, span.read_slots).unsqueeze(0)
            values = v_cache.index_select(1, span.read_slots).unsqueeze(0)
            out[:, :, span.begin : span.end] = attention(
                q[:, :, span.begin : span.end], keys, values, span.mask
            )
        for group in self.decodes:
            out.index_copy_(2, group.rows, group.attend(q, k_cache, v_cache))
        if batch is not None:
            out.index_copy_(2, batch.rows, batch.attend(q, k_cache, v_cache, self.cache.block_size))
        return out
