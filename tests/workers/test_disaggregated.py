"""1P1D, 2P2D and the colocated worker, each worker in its own process, KV over ZMQ on
loopback: every output equals engine.LLM's greedy output for the same prompt."""

from __future__ import annotations

import pytest
import torch
from driver import run_colocated, run_disaggregated, run_many
from helpers import greedy
from worker_driver import wait_idle, wait_load
from worker_procs import spawn, stop_all, worker_config

from pdserve.engine import LLM, NoFreeBlocksError
from pdserve.protocol import DecodeOrder, FinishReason, PrefillStatus, WorkerRole

MAX_TOKENS = 12


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    prompts = []
    for i, n in enumerate(torch.randint(1, 300, (20,), generator=g).tolist()):
        tail = torch.randint(0, 256, (n,), generator=g).tolist()
        prompts.append(shared + tail if i % 4 == 0 else tail)  # some share a prefix
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def procs(tiny_llama_dir):
    procs = spawn([worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p0"),
                   worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p1"),
                   worker_config(WorkerRole.DECODE, tiny_llama_dir, "d0"),
                   worker_config(WorkerRole.DECODE, tiny_llama_dir, "d1"),
                   worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c0")])
    yield dict(zip(["p0", "p1", "d0", "d1", "c0"], procs, strict=True))
    stop_all(procs)


@pytest.fixture(scope="module")
def expected(tiny_llama_dir) -> list[list[int]]:
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=2048)
    return [o.token_ids for o in llm.generate(PROMPTS, greedy(MAX_TOKENS))]


@pytest.fixture(autouse=True)
def no_leaks(procs):
    yield
    for p in procs.values():
        wait_idle(p.worker)


def test_one_prefill_one_decode_equals_llm(procs, collector, expected):
    outs = run_many(collector, [procs["p0"].worker], [procs["d0"].worker], PROMPTS,
                    greedy(MAX_TOKENS), "1p1d")
    for i, out in enumerate(outs):
        assert out.token_ids == expected[i], f"prompt {i} ({len(PROMPTS[i])} tokens)"
        assert out.finish is FinishReason.LENGTH
        assert out.prefill.status is PrefillStatus.DONE


def test_two_prefill_two_decode_equals_llm(procs, collector, expected):
    prefills = [procs["p0"].worker, procs["p1"].worker]
    decodes = [procs["d0"].worker, procs["d1"].worker]
    # prompts 0,2,4.. go p0->d0 and 1,3,5.. p1->d1; shift the decodes to cross the pairs
    outs = run_many(collector, prefills, decodes[::-1], PROMPTS, greedy(MAX_TOKENS), "2p2d")
    assert [o.token_ids for o in outs] == expected


def test_colocated_equals_llm(procs, collector, expected):
    outs = [run_colocated(collector, procs["c0"].worker, f"co-{i}", p, greedy(MAX_TOKENS))
            for i, p in enumerate(PROMPTS)]
    assert [o.token_ids for o in outs] == expected


def test_a_prefix_cache_hit_on_the_prefill_worker_still_sends_every_token(procs, collector,
                                                                            expected):
    p, d = procs["p1"].worker, procs["d1"].worker
    first = run_disaggregated(collector, p, d, "hit-a", PROMPTS[0], greedy(MAX_TOKENS))
    again = run_disaggregated(collector, p, d, "hit-b", PROMPTS[0], greedy(MAX_TOKENS))
    assert again.prefill.num_cached_tokens >= 40  # the shared prefix, at least
    assert first.token_ids == again.token_ids == expected[0]


def test_stage_stamps_are_ordered(procs, collector):
    out = run_disaggregated(collector, procs["p0"].worker, procs["d0"].worker, "stamps",
                            PROMPTS[1], greedy(MAX_TOKENS))
    ps, ds = out.prefill.stamps, out.stream.final.stamps
    chain = [ds.received, ps.received, ps.prefill_start, ps.kv_send_start, ps.prefill_end,
             ds.kv_received, ds.decode_admitted, ds.first_token, ds.finished]
    assert all(t > 0 for t in chain), chain
    assert chain == sorted(chain)
    assert ps.kv_send_end >= ps.prefill_end
    # the hand-off brought the prefill worker's stamps, so the final chunk has them all
    assert (ds.prefill_start, ds.prefill_end) == (ps.prefill_start, ps.prefill_end)
    assert out.stream.first.stamps.decode_admitted == ds.decode_admitted
    assert out.stream.times == sorted(out.stream.times)
    assert out.stream.times[0] >= ds.first_token and out.stream.times[-1] >= ds.finished


def test_colocated_stamps_cover_the_local_prefill(procs, collector):
    out = run_colocated(collector, procs["c0"].worker, "co-stamps", PROMPTS[2], greedy(4))
    s = out.stream.final.stamps
    assert 0 < s.received <= s.prefill_start <= s.prefill_end == s.first_token <= s.finished
    assert s.kv_received == 0.0


def test_bad_jobs_are_refused_and_leave_nothing(procs, collector):
    d = procs["d0"].worker
    with pytest.raises(ValueError, match="outside the vocabulary"):
        d.reserve(DecodeOrder("bad", (1, 2, 9999), greedy(4), collector.endpoint))
    with pytest.raises(ValueError, match="maximum length"):
        d.reserve(DecodeOrder("bad", tuple(range(200)) * 3, greedy(4), collector.endpoint))
    assert d.job_state("bad") is None


def test_a_full_decode_worker_refuses_a_reservation_and_holds_nothing_for_it(procs,
                                                                             collector):
    d = procs["d1"].worker
    prompt = tuple(range(1, 251)) * 2  # 500 tokens: 125 of the 512 blocks
    held = [f"fill-{i}" for i in range(4)]
    for tid in held:
        d.reserve(DecodeOrder(tid, prompt, greedy(4), collector.endpoint))
    with pytest.raises(NoFreeBlocksError):
        d.reserve(DecodeOrder("one-too-many", prompt, greedy(4), collector.endpoint))
    wait_load(d, lambda e: e.num_reserved == 4 and e.num_free_blocks == 512 - 4 * 125)
    assert d.job_state("one-too-many") is None
    for tid in held:
        d.abort(tid)
        assert collector.wait_final(tid).final.finish is FinishReason.ABORT
