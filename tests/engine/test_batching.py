"""The engine under continuous batching gives each request exactly the tokens it gets alone:
staggered arrivals, chunked prefill at several budgets, forced preemption, aborts, and the
prefill-only -> decode-only hand-off the workers rely on."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_leaks, greedy, make_engine, run_to_completion

from pdserve.engine import EngineMode, RequestStatus, ScheduledBatch
from pdserve.kvtransfer.layout import scatter_tokens

PROMPTS = {f"r{i}": [(i * 31 + j * 7) % 250 + 3 for j in range(n)]
           for i, n in enumerate([5, 23, 64, 9, 41, 17, 70, 3])}
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def alone(tiny_llama_dir) -> dict[str, list[int]]:
    """Each prompt run by itself in a fresh engine."""
    out = {}
    for rid, prompt in PROMPTS.items():
        engine = make_engine(tiny_llama_dir)
        engine.add_request(rid, prompt, greedy(NEW_TOKENS))
        out[rid] = run_to_completion(engine)[rid]
    return out


def run_staggered(engine, prompts, arrivals_per_step=2) -> dict[str, list[int]]:
    pending = list(prompts.items())
    tokens: dict[str, list[int]] = {}
    while pending or engine.has_work():
        for rid, prompt in pending[:arrivals_per_step]:
            engine.add_request(rid, prompt, greedy(NEW_TOKENS))
        pending = pending[arrivals_per_step:]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize("budget", [7, 16, 64, 2048])
@pytest.mark.parametrize("block_size", [4, 16])
def test_staggered_chunked_batching_equals_running_alone(tiny_llama_dir, alone, budget,
                                                         block_size):
    engine = make_engine(tiny_llama_dir, block_size=block_size,
                         max_num_batched_tokens=budget)
    assert run_staggered(engine, PROMPTS) == alone
    assert_no_leaks(engine)


def test_forced_preemption_equals_running_alone(tiny_llama_dir, alone):
    engine = make_engine(tiny_llama_dir, block_size=4, num_blocks=30)  # 120 slots for ~330
    tokens = run_staggered(engine, PROMPTS, arrivals_per_step=8)
    assert engine.stats().num_preemptions > 0
    assert tokens == alone
    assert_no_leaks(engine)


def test_abort_at_every_stage_frees_everything(tiny_llama_dir, alone):
    engine = make_engine(tiny_llama_dir, block_size=4, max_num_batched_tokens=16)
    engine.add_request("decoding", PROMPTS["r0"], greedy(50))
    engine.add_request("prefilling", PROMPTS["r6"], greedy(50))  # 70 tokens: 5 chunks
    for _ in range(2):
        engine.step()
    engine.add_request("waiting", PROMPTS["r2"], greedy(50))
    engine.add_request("keep", PROMPTS["r3"], greedy(NEW_TOKENS))
    sched = engine.scheduler
    assert sched.requests["decoding"].num_output_tokens > 0
    assert sched.requests["prefilling"].is_prefilling
    assert sched.requests["prefilling"].status is RequestStatus.RUNNING
    assert sched.requests["waiting"].status is RequestStatus.WAITING
    for rid in ("decoding", "prefilling", "waiting"):
        assert engine.abort(rid)
    assert run_to_completion(engine)["keep"] == alone["r3"]
    assert_no_leaks(engine)


class KVCapture:
    """A per-layer hook that keeps each request's K/V as the prefill engine computes it."""

    def __init__(self):
        self.kv: dict[str, dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]]] = {}
        self.calls = 0

    def __call__(self, batch: ScheduledBatch):
        spans, offset = [], 0
        for item in batch.requests:
            spans.append((item.request.request_id, item.start, offset, item.num_new_tokens))
            offset += item.num_new_tokens

        def hook(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            assert k.shape[0] == offset
            self.calls += 1
            for rid, start, row, n in spans:
                self.kv.setdefault(rid, {}).setdefault(layer, []).append(
                    (start, k[row:row + n].clone(), v[row:row + n].clone()))

        return hook


@pytest.mark.parametrize("p_budget", [16, 2048])
def test_prefill_only_to_decode_only_handoff(tiny_llama_dir, alone, p_budget):
    """P computes prompts (chunked), its hook captures each layer's KV; D reserves blocks of
    another size, gets the KV scattered in (kvtransfer.layout, as the workers will), and
    decodes exactly what a mixed engine would."""
    prefill = make_engine(tiny_llama_dir, block_size=4, max_num_batched_tokens=p_budget,
                          mode=EngineMode.PREFILL_ONLY)
    decode = make_engine(tiny_llama_dir, block_size=16, mode=EngineMode.DECODE_ONLY)
    capture = KVCapture()
    for rid, prompt in PROMPTS.items():
        prefill.add_request(rid, prompt, greedy(NEW_TOKENS))
    first_tokens: dict[str, int] = {}
    steps = 0
    while prefill.has_work():
        steps += 1
        for out in prefill.step(kv_hook=capture):
            assert out.finished and out.finish_reason is None  # handed off, not ended
            first_tokens[out.request_id] = out.new_token_ids[0]
    assert capture.calls == steps * prefill.config.model.num_layers
    assert_no_leaks(prefill)

    tokens = {}
    for rid, prompt in PROMPTS.items():
        blocks = decode.reserve(rid, prompt, greedy(NEW_TOKENS)).block_ids
        for layer, pieces in capture.kv[rid].items():
            for start, k, v in pieces:
                k_layer, v_layer = decode.kv_cache.layer(layer)
                scatter_tokens(k_layer, blocks, start, k)
                scatter_tokens(v_layer, blocks, start, v)
        covered = sorted((s, s + k.shape[0]) for s, k, _ in capture.kv[rid][0])
        assert covered[0][0] == 0 and covered[-1][1] == len(prompt)
        decode.admit_prefilled(rid, first_tokens[rid])
        tokens[rid] = [first_tokens[rid]]
    for rid, more in run_to_completion(decode).items():
        tokens[rid] += more
    assert tokens == alone
    assert_no_leaks(decode)


def test_reserved_request_abort_and_stats(tiny_llama_dir):
    decode = make_engine(tiny_llama_dir, block_size=4, num_blocks=16,
                         mode=EngineMode.DECODE_ONLY)
    decode.reserve("a", PROMPTS["r1"], greedy(4))  # 23 tokens -> 6 blocks
    stats = decode.stats()
    assert (stats.num_reserved, stats.num_free_blocks) == (1, 10)
    assert decode.abort("a") and not decode.abort("a")
    assert_no_leaks(decode)


def test_engine_counters(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4, max_num_batched_tokens=16)
    engine.add_request("a", PROMPTS["r6"], greedy(4))  # 70 tokens
    engine.add_request("b", PROMPTS["r0"], greedy(4))  # 5 tokens
    s = engine.stats()
    assert (s.num_waiting, s.num_running, s.num_queued_prefill_tokens) == (2, 0, 75)
    engine.step()  # a's first 16-token chunk
    s = engine.stats()
    assert (s.num_waiting, s.num_running, s.num_queued_prefill_tokens) == (1, 1, 59)
    assert s.num_free_blocks == s.num_total_blocks - 4
    run_to_completion(engine)
    assert_no_leaks(engine)
