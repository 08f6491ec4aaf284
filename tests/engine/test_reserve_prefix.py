"""A decode-only reservation takes the prompt's cached prefix from the prefix cache (whole
blocks, never the last prompt token) and holds references on it until the request ends,
so what it matched cannot be evicted before it is used. Scheduler bookkeeping only (fake
tokens, no model); every test ends with every block free."""

from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.config import EngineMode, SchedulerConfig
from pdserve.engine.request import Request, SamplingParams
from pdserve.engine.scheduler import Scheduler

BS = 4


def decode_scheduler(num_blocks=32) -> Scheduler:
    return Scheduler(SchedulerConfig(mode=EngineMode.DECODE_ONLY, max_num_batched_tokens=32,
                                     max_num_seqs=16),
                     BlockManager(num_blocks, BS), max_model_len=1024, eos_token_ids=(0,))


def req(rid: str, n: int, max_tokens: int = 4) -> Request:
    return Request(rid, [(7 * i + len(rid)) % 50 + 1 for i in range(n)],
                   SamplingParams(max_tokens=max_tokens, temperature=0.0))


def drain(s: Scheduler) -> None:
    """Decode every running request to its end; each step's token is a fixed 13."""
    for _ in range(1000):
        if not s.has_work():
            return
        batch = s.schedule()
        s.update(batch, [13 if i.samples else None for i in batch.requests])
    raise AssertionError("scheduler did not drain")


def assert_empty(s: Scheduler) -> None:
    bm = s.block_manager
    assert not s.requests and not s.reserved and not s.running
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def served(s, rid: str, n: int, max_tokens: int = 6) -> list[int]:
    """Reserve, admit and decode a request to the end; prompt + output (the context whose
    computed full blocks the decode worker's cache now holds)."""
    r = req(rid, n, max_tokens=max_tokens)
    s.reserve(r)
    s.admit_prefilled(rid, 11)
    drain(s)
    return r.all_token_ids


def follow_up(rid: str, context: list[int], extra: int) -> Request:
    """A multi-turn request: the previous context and `extra` new tokens."""
    return Request(rid, context + [40 + i % 9 for i in range(extra)],
                   SamplingParams(max_tokens=3, temperature=0.0))


def test_a_follow_up_reserves_only_what_the_cache_lacks():
    s = decode_scheduler()
    context = served(s, "a", 10)  # 10 prompt + 6 output: 15 tokens computed, 3 full blocks
    bm = s.block_manager
    r = follow_up("b", context, 7)  # 23 tokens
    held = s.reserve(r)
    assert held.num_cached_tokens == 12 and len(held.cached_block_ids) == 3
    assert len(held.fresh_block_ids) == 6 - 3 and held.block_ids == r.block_ids
    assert all(bm.ref_count(b) == 1 for b in held.block_ids)
    assert bm.num_used_blocks == 6  # the 3 cached blocks count as in use while referenced
    assert s.num_prefix_hit_tokens == 12
    out = s.admit_prefilled("b", 5)
    assert out.num_cached_tokens == 12 and r.num_computed_tokens == 23
    drain(s)
    assert_empty(s)
    # the prefix stays cached, unreferenced, for the next turn (and b's prompt added one)
    assert bm.match_prefix(context, 10)[0][:3] == list(held.cached_block_ids)


@pytest.mark.parametrize("extra, cached", [(0, 8), (1, 12), (4, 12)])
def test_the_last_prompt_token_is_never_served_from_the_cache(extra, cached):
    s = decode_scheduler()
    context = served(s, "a", 12, max_tokens=5)  # 16 tokens, 15 computed: 3 full blocks
    prompt = context[:12] + context[12:12 + extra] if extra else context[:12]
    held = s.reserve(Request("b", prompt, SamplingParams(max_tokens=2)))
    # 12 tokens: the third block is cached but holds the last token, so it is sent
    assert held.num_cached_tokens == cached
    assert held.num_cached_tokens < len(prompt)
    assert s.abort("b")
    assert_empty(s)


def test_matched_blocks_cannot_be_evicted_while_the_reservation_holds_them():
    s = decode_scheduler(num_blocks=8)
    context = served(s, "a", 10)  # 3 cached blocks, all 8 free
    held = s.reserve(follow_up("b", context, 1))  # 17 tokens: 3 cached + 2 fresh
    bm = s.block_manager
    assert bm.num_free_blocks == 3
    s.reserve(req("other", 12))  # a prompt of its own: takes every free block, none of b's
    assert bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        s.reserve(req("d", 1))
    assert all(bm.ref_count(b) == 1 for b in held.cached_block_ids)
    assert s.abort("other") and s.abort("b")
    assert_empty(s)


def test_two_reservations_share_the_cached_blocks_and_a_refusal_holds_nothing():
    s = decode_scheduler(num_blocks=9)
    context = served(s, "a", 10)
    bm = s.block_manager
    one = s.reserve(follow_up("b", context, 3))  # 19 tokens: 3 cached + 2 fresh
    two = s.reserve(follow_up("c", context, 3))
    assert one.cached_block_ids == two.cached_block_ids
    assert all(bm.ref_count(b) == 2 for b in one.cached_block_ids)
    assert bm.num_free_blocks == 9 - 3 - 4
    with pytest.raises(NoFreeBlocksError):  # 3 cached + 3 fresh: one fresh block too many
        s.reserve(follow_up("d", context, 9))
    assert all(bm.ref_count(b) == 2 for b in one.cached_block_ids)
    assert "d" not in s.requests and bm.num_free_blocks == 2
    assert s.abort("b")
    assert all(bm.ref_count(b) == 1 for b in one.cached_block_ids)
    s.admit_prefilled("c", 5)
    drain(s)
    assert_empty(s)


def test_without_prefix_caching_nothing_is_matched():
    s = decode_scheduler()
    s.block_manager.enable_prefix_caching = False
    context = served(s, "a", 10)
    assert s.reserve(follow_up("b", context, 3)).num_cached_tokens == 0
    assert s.abort("b")
    assert_empty(s)
