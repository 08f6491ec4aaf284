"""Prefill over cached prefix blocks computes the same thing as a full prefill."""

from __future__ import annotations

import torch
from helpers import assert_no_leaks, greedy, make_engine, prefill_logits, run_to_completion

SHARED = [(i * 13 + 7) % 256 for i in range(22)]


def test_cached_prefix_gives_same_logits_as_full_prefill(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4)
    engine.add_request("first", SHARED + [1, 2, 3], greedy(1))
    run_to_completion(engine)  # leaves SHARED's 5 full blocks (20 tokens) in the cache

    prompt = SHARED + [9, 8, 7, 6, 5]
    engine.add_request("second", prompt, greedy(1))
    batch = engine.scheduler.schedule()
    (item,) = batch.requests
    assert item.start == 20 and item.request.num_cached_tokens == 20
    cached_logits = engine.runner.execute(batch)[0]
    engine.abort("second")

    fresh = make_engine(tiny_llama_dir, block_size=4, enable_prefix_caching=False)
    full_logits = prefill_logits(fresh, {"x": prompt})["x"]
    assert torch.allclose(cached_logits, full_logits, rtol=1e-5, atol=1e-5)
    assert engine.stats().num_prefix_hit_tokens == 20
    assert_no_leaks(engine)
    assert_no_leaks(fresh)


def test_prefix_reuse_gives_same_tokens(tiny_llama_dir):
    prompts = {f"r{i}": SHARED + [i, i + 1, i + 2] for i in range(4)}
    results = []
    for caching in (True, False):
        engine = make_engine(tiny_llama_dir, block_size=4, enable_prefix_caching=caching)
        tokens: dict[str, list[int]] = {}
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, greedy(12))
            for out in engine.step():  # staggered: later requests find earlier blocks
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        for rid, more in run_to_completion(engine).items():
            tokens.setdefault(rid, []).extend(more)
        results.append((engine, tokens))
    (cached, a), (plain, b) = results
    assert a == b and all(len(t) == 12 for t in a.values())
    assert cached.stats().num_prefix_hit_tokens == 3 * 20
    assert plain.stats().num_prefix_hit_tokens == 0
    assert_no_leaks(cached)
    assert_no_leaks(plain)


def test_whole_prompt_cached_still_computes_last_token(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4)
    prompt = SHARED[:16]  # exactly 4 full blocks
    engine.add_request("a", prompt, greedy(3))
    first = run_to_completion(engine)["a"]
    engine.add_request("b", prompt, greedy(3))
    batch = engine.scheduler.schedule()
    assert batch.requests[0].start == 12  # 3 blocks reused, the last block recomputed
    engine.abort("b")
    engine.add_request("c", prompt, greedy(3))
    assert run_to_completion(engine)["c"] == first
    assert_no_leaks(engine)


def test_llm_reports_prefix_cache_hits(tiny_llama_dir):
    from pdserve.engine import LLM

    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=64)
    first, = llm.generate([SHARED], greedy(3))
    second, = llm.generate([SHARED], greedy(3))
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20  # 5 full blocks; the last token is recomputed
    assert second.token_ids == first.token_ids
    assert_no_leaks(llm.engine)
