"""Block manager invariants: references, the free pool, the prefix cache."""

from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError, hash_block


def _all_free(bm: BlockManager) -> bool:
    return bm.num_free_blocks == bm.num_blocks


def test_allocate_and_free_are_balanced():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8 and bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(1)
    bm.free(a)
    bm.free(b)
    assert _all_free(bm)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(a)


def test_prefix_match_acquire_and_eviction():
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    blocks = bm.allocate(3)
    h0 = hash_block(None, tokens[0:2])
    h1 = hash_block(h0, tokens[2:4])
    bm.register(blocks[0], h0, tokens[0:2])
    bm.register(blocks[1], h1, tokens[2:4])
    bm.free(blocks)
    assert _all_free(bm)

    hits, hashes = bm.match_prefix(tokens, max_blocks=2)
    assert hits == blocks[:2] and hashes == [h0, h1]
    # a different first block breaks the chain, even if the second block's tokens match
    assert bm.match_prefix([9, 9, 3, 4], max_blocks=2) == ([], [])
    assert bm.num_free_after_acquire(hits) == 2
    bm.acquire(hits)
    assert bm.ref_count(hits[0]) == 1
    bm.acquire(hits[:1])  # a second request sharing the first block
    assert bm.ref_count(hits[0]) == 2
    bm.free(hits[:1])
    bm.free(hits)
    assert _all_free(bm)

    # allocating every block evicts the cached ones
    everything = bm.allocate(4)
    assert bm.match_prefix(tokens, max_blocks=2) == ([], [])
    bm.free(everything)
    assert _all_free(bm)


def test_least_recently_freed_is_evicted_first():
    bm = BlockManager(num_blocks=3, block_size=1)
    old, new = bm.allocate(1), bm.allocate(1)
    bm.register(old[0], hash_block(None, [7]), [7])
    bm.register(new[0], hash_block(None, [8]), [8])
    bm.free(old)
    bm.free(new)
    taken = bm.allocate(2)  # the never-used block, then the oldest freed
    assert old[0] in taken and new[0] not in taken
    assert bm.match_prefix([8], 1)[0] == new
    assert bm.match_prefix([7], 1)[0] == []
    bm.free(taken)
    assert _all_free(bm)


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=2, block_size=1, enable_prefix_caching=False)
    b = bm.allocate(1)
    bm.register(b[0], hash_block(None, [1]), [1])
    bm.free(b)
    assert bm.match_prefix([1, 2], 2) == ([], [])


def test_prefix_events_report_blocks_entering_and_leaving_the_cache():
    bm = BlockManager(num_blocks=2, block_size=2)
    assert bm.drain_prefix_events() == ([], [])  # recording starts now
    a, b = bm.allocate(2)
    bm.register(a, 11, [1, 2])
    bm.register(b, 22, [3, 4])
    assert bm.drain_prefix_events() == ([11, 22], [])
    bm.free([a, b])
    (c,) = bm.allocate(1)  # evicts the least recently freed cached block
    assert bm.drain_prefix_events() == ([], [22 if c == b else 11])
    bm.reset_prefix_cache()
    assert bm.drain_prefix_events() == ([], [11 if c == b else 22])
