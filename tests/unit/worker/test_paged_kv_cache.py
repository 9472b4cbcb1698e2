"""The paged cache on a tiny random model: a flattened batch of chunks from several sequences,
their blocks scattered and partly shared, gives each sequence the logits it gets alone."""

from __future__ import annotations

import pytest
import torch

from services.worker.model import paged_attention_cpu
from services.worker.model.kv_cache import ContiguousKVCache
from services.worker.model.llama import LlamaModel
from services.worker.model.paged_kv_cache import PagedForwardContext, PagedKVCache
from tests.unit.worker.test_model import ARGS, model, run

__all__ = ["model"]  # the module-scoped fixture, shared with test_model

BLOCK = 4


@pytest.fixture(params=[True, False], ids=["decode-kernel", "torch-ops"])
def decode_kernel(request: pytest.FixtureRequest) -> bool:
    """Every model-level check runs on both decode attention paths."""
    return bool(request.param)


def make_cache(num_blocks: int, decode_kernel: bool, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    return PagedKVCache(ARGS, num_blocks, BLOCK, dtype, torch.device("cpu"), decode_kernel=decode_kernel)


def paged_step(
    model: LlamaModel, cache: PagedKVCache, chunks: list[tuple[list[int], int, list[int]]]
) -> list[torch.Tensor]:
    """chunks: (token ids, start position, block table); logits of every token, per chunk."""
    with torch.inference_mode():
        ids = torch.tensor([[t for tokens, _, _ in chunks for t in tokens]])
        positions = torch.cat([torch.arange(start, start + len(tokens)) for tokens, start, _ in chunks])
        x = model.embed_tokens(ids)
        ctx = PagedForwardContext.build(
            cache,
            [(start, len(tokens), table) for tokens, start, table in chunks],
            model.rope(positions.unsqueeze(0), x.dtype),
        )
        logits = model.compute_logits(model.run_layers(x, ctx))[0]
    return [logits[span.begin : span.end] for span in ctx.spans]


A = [5, 9, 33, 2, 17, 40, 8, 1, 63, 22, 11]
B = [7, 7, 3, 50, 12, 19, 44, 2, 5]
# Shares A's first two blocks.
C = [*A[:8], 30, 31, 32, 33]


def test_mixed_batch_matches_each_sequence_alone(model: LlamaModel, decode_kernel: bool) -> None:
    cache = make_cache(16, decode_kernel)
    # Scattered, out-of-order blocks: the gather must follow the tables.
    table_a, table_b = [9, 2, 14], [5, 11, 0]
    step1 = paged_step(model, cache, [(A[:6], 0, table_a[:2]), (B[:9], 0, table_b)])
    # Step 2: A finishes its prompt, B decodes one token, C reuses A's two full blocks and adds one.
    table_c = [9, 2, 7]
    step2 = paged_step(model, cache, [(A[6:], 6, table_a), (C[8:], 8, table_c), ([4], 9, table_b)])
    torch.testing.assert_close(torch.cat([step1[0], step2[0]]), run(model, A, [len(A)]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.cat([step1[1], step2[2]]), run(model, [*B, 4], [len(B) + 1]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(step2[1], run(model, C, [len(C)])[8:], atol=1e-5, rtol=1e-5)


def test_paged_decode_matches_contiguous_decode(model: LlamaModel, decode_kernel: bool) -> None:
    paged = make_cache(8, decode_kernel)
    table = [3, 6, 1]
    contiguous = ContiguousKVCache(ARGS, 64, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        for pos, token in enumerate(A):
            [got] = paged_step(model, paged, [([token], pos, table)])
            want = model.compute_logits(
                model(torch.tensor([[token]]), torch.tensor([[pos]]), contiguous, pos)
            )[0]
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_block_bytes_counts_keys_and_values_of_every_layer() -> None:
    cache = PagedKVCache(
        ARGS, num_blocks=3, block_size=BLOCK, dtype=torch.bfloat16, device=torch.device("cpu")
    )
    assert cache.nbytes == 3 * PagedKVCache.block_bytes(ARGS, BLOCK, torch.bfloat16)


def test_decodes_of_different_lengths_padded_together_match_each_alone(
    model: LlamaModel, decode_kernel: bool
) -> None:
    cache = make_cache(16, decode_kernel)
    tables = {"a": [9, 2, 14], "b": [5, 11, 0], "c": [9, 2, 7]}
    # Prompts of 10, 8 and 11 tokens (C shares A's first two blocks), then one decode step for all
    # three at once: different lengths, so the two shorter ones attend through padding.
    paged_step(model, cache, [(A[:10], 0, tables["a"]), (B[:8], 0, tables["b"])])
    paged_step(model, cache, [(C[8:11], 8, tables["c"])])
    decoded = paged_step(
        model, cache, [([A[10]], 10, tables["a"]), ([B[8]], 8, tables["b"]), ([6], 11, tables["c"])]
    )
    torch.testing.assert_close(decoded[0], run(model, A, [len(A)])[-1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded[1], run(model, B, [len(B)])[-1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded[2], run(model, [*C[:11], 6], [12])[-1:], atol=1e-5, rtol=1e-5)


def test_length_groups_bound_padding_and_keep_groups_big_enough() -> None:
    from services.worker.model.paged_kv_cache import length_groups

    # Enough of every length class: each group's longest is within 2x its shortest.
    counts = [1, 2, 1, 2, 9, 12, 16, 10, 3, 4, 4, 3]
    groups = length_groups(counts, min_group=4)
    assert sorted(i for g in groups for i in g) == list(range(len(counts)))
    assert len(groups) == 3
    for g in groups:
        assert max(counts[i] for i in g) <= 2 * min(counts[i] for i in g)
    # Too few of a length class: they join the next longer group rather than run alone.
    groups = length_groups([1, 1, 2, 1, 9, 12, 16, 10, 3, 4], min_group=4)
    assert all(len(g) >= 4 for g in groups)
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert length_groups([5], min_group=4) == [[0]]


def test_decodes_in_several_length_groups_match_each_alone(model: LlamaModel, decode_kernel: bool) -> None:
    """Eight decodes, four short and four long: two groups, each padded to its own longest."""
    cache = make_cache(64, decode_kernel)
    prompts = [A[: 2 + i] for i in range(4)] + [(A + B + A)[: 20 + 3 * i] for i in range(4)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    paged_step(model, cache, [(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    decoded = paged_step(model, cache, [([6], len(p), t) for p, t in zip(prompts, tables, strict=True)])
    for p, got in zip(prompts, decoded, strict=True):
        torch.testing.assert_close(got, run(model, [*p, 6], [len(p) + 1])[-1:], atol=1e-5, rtol=1e-5)


def test_one_group_of_interleaved_lengths_keeps_the_batch_order(
    model: LlamaModel, decode_kernel: bool
) -> None:
    """Long, short, long: one group (too few for two), whose rows must come back in batch order."""
    cache = make_cache(32, decode_kernel)
    prompts = [(A + B)[:18], A[:2], (B + A)[:15]]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    paged_step(model, cache, [(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    decoded = paged_step(model, cache, [([6], len(p), t) for p, t in zip(prompts, tables, strict=True)])
    for p, got in zip(prompts, decoded, strict=True):
        torch.testing.assert_close(got, run(model, [*p, 6], [len(p) + 1])[-1:], atol=1e-5, rtol=1e-5)


def test_the_decode_kernel_builds_for_float32_on_cpu_only() -> None:
    # Without this the decode-kernel cases above would quietly test the torch path twice.
    assert paged_attention_cpu.available(torch.float32, torch.device("cpu"))
    assert not paged_attention_cpu.available(torch.bfloat16, torch.device("cpu"))
    assert make_cache(4, decode_kernel=True).decode_kernel
    assert PagedKVCache(ARGS, 4, BLOCK, torch.bfloat16, torch.device("cpu")).decode_kernel is False


def test_decode_kernel_matches_softmax_attention_over_each_sequences_own_blocks() -> None:
    """Scattered blocks, lengths that end inside a block, four query heads per key head: each
    sequence's output is plain softmax attention over exactly its own positions."""
    gen = torch.Generator().manual_seed(0)
    kv_heads, group, head_dim, size, num_blocks = 2, 4, 24, 4, 40
    k_cache = torch.randn(kv_heads, num_blocks * size, head_dim, generator=gen)
    v_cache = torch.randn(kv_heads, num_blocks * size, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    lengths = [1, 5, 13, 8, 30]
    tables = []
    for n in lengths:
        tables.append([order.pop() for _ in range(-(-n // size))])
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=gen)
    got = paged_attention_cpu.decode_attention(q, k_cache, v_cache, padded, torch.tensor(lengths), size)
    for i, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        slots = torch.tensor([table[p // size] * size + p % size for p in range(n)])
        keys = k_cache[:, slots].repeat_interleave(group, dim=0)  # [heads, n, d]
        values = v_cache[:, slots].repeat_interleave(group, dim=0)
        probs = torch.softmax(q[i].unsqueeze(1) @ keys.transpose(1, 2) * head_dim**-0.5, dim=-1)
        torch.testing.assert_close(got[i], (probs @ values)[:, 0], atol=1e-5, rtol=1e-5)
