"""Block manager: reference counts, prefix-cache hits and least-recently-freed eviction."""

from __future__ import annotations

import pytest

from services.worker.core.block_manager import BlockManager, hash_block


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, 4)
    ids = bm.allocate(5)
    assert len(set(ids)) == 5 and bm.num_used_blocks == 5 and bm.num_free_blocks == 3
    bm.free(ids)
    assert bm.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_cannot_allocate_more_than_free() -> None:
    bm = BlockManager(4, 4)
    bm.allocate(3)
    with pytest.raises(RuntimeError, match="asked for 2 blocks, 1 free"):
        bm.allocate(2)


def test_double_free_is_caught_instead_of_going_negative() -> None:
    bm = BlockManager(4, 4)
    ids = bm.allocate(1)
    bm.free(ids)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(ids)
    assert bm.blocks[ids[0]].ref_count == 0


def test_hash_chains_over_the_whole_prefix() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == a
    assert hash_block(None, [1, 2, 3, 5]) != a
    # Same tokens after a different prefix are a different block.
    assert hash_block(hash_block(None, [9, 9, 9, 9]), [1, 2, 3, 4]) != hash_block(a, [1, 2, 3, 4])


def test_shared_cached_block_counts_each_holder() -> None:
    bm = BlockManager(4, 4)
    h = hash_block(None, [1, 2, 3, 4])
    [block] = bm.allocate(1)
    bm.cache_block(block, h)
    assert bm.find_cached([h]) == [block]
    bm.take_cached([block])
    assert bm.blocks[block].ref_count == 2
    bm.free([block])
    assert bm.num_used_blocks == 1
    bm.free([block])
    assert bm.num_used_blocks == 0
    # Free but still cached: a later hit revives it without recomputing.
    assert bm.find_cached([h]) == [block]
    assert bm.can_allocate([block], 3)
    assert not bm.can_allocate([block], 4)
    bm.take_cached([block])
    assert bm.num_used_blocks == 1 and bm.blocks[block].ref_count == 1


def test_first_cached_copy_of_a_block_wins() -> None:
    bm = BlockManager(4, 4)
    h = hash_block(None, [1, 2, 3, 4])
    first, second = bm.allocate(2)
    bm.cache_block(first, h)
    bm.cache_block(second, h)
    assert bm.find_cached([h]) == [first]
    assert bm.blocks[second].hash is None


def test_lookup_stops_at_the_first_miss() -> None:
    bm = BlockManager(4, 4)
    h1 = hash_block(None, [1, 2, 3, 4])
    h2 = hash_block(h1, [5, 6, 7, 8])
    h3 = hash_block(h2, [9, 9, 9, 9])
    b1, _, b3 = bm.allocate(3)
    bm.cache_block(b1, h1)
    bm.cache_block(b3, h3)
    assert bm.find_cached([h1, h2, h3]) == [b1]


def test_eviction_takes_least_recently_freed_cached_blocks_and_uncached_ones_first() -> None:
    bm = BlockManager(4, 4)
    ha = hash_block(None, [1, 1, 1, 1])
    hb = hash_block(None, [2, 2, 2, 2])
    a, b, plain = bm.allocate(3)
    bm.cache_block(a, ha)
    bm.cache_block(b, hb)
    bm.free([a])
    bm.free([b])
    bm.free([plain])
    # The spare block and the uncached one go before any cached block.
    assert set(bm.allocate(2)) == {plain, 3}
    assert bm.num_cached_blocks == 2
    # Then the one freed longest ago.
    assert bm.allocate(1) == [a]
    assert bm.find_cached([ha]) == [] and bm.find_cached([hb]) == [b]


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    h = hash_block(None, [1, 2, 3, 4])
    [block] = bm.allocate(1)
    bm.cache_block(block, h)
    assert bm.find_cached([h]) == []


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0)])
def test_sizes_are_checked(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockManager(num_blocks, block_size)
