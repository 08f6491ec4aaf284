"""Decode-side prefix reuse: a follow-up request whose prompt starts with what the decode
worker's prefix cache holds (a multi-turn chat: the first prompt, its answer, a new turn)
is reserved with those blocks, and the prefill worker sends only the rest. On every
transport (workers as objects in this process) and with the real model through worker
processes: greedy output equals engine.LLM's, the second transfer carries exactly the
shared full blocks' bytes fewer, and no block is left referenced on either side."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from driver import reserve, submit
from helpers import greedy
from worker_driver import wait_idle
from worker_procs import spawn, stop_all, worker_config

from pdserve.bench.stream_collector import StreamCollector
from pdserve.decode_worker import DecodeWorker
from pdserve.engine import LLM, ModelConfig
from pdserve.kvtransfer.transports import TransportKind
from pdserve.prefill_worker import PrefillWorker
from pdserve.protocol import PrefillStatus, WorkerRole

BS = 4  # the workers' block size (worker_config's default)
MAX_TOKENS = 8


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


FIRST = _tokens(1, 45)


def run(collector, p, d, tid, prompt, max_tokens=MAX_TOKENS):
    """One request through `p` and `d`; (its tokens, the reservation, the bytes sent)."""
    reservation = reserve(collector, d, tid, prompt, greedy(max_tokens))
    submit(collector, p, tid, prompt, greedy(max_tokens), reservation)
    s = collector.wait_final(tid)
    assert collector.wait_outcome(tid).status is PrefillStatus.DONE
    return s.token_ids, reservation, s.final.kv_bytes


def cached_after(computed: int, prompt_len: int, block_size: int = BS) -> int:
    """The prompt tokens a decode worker holds for a follow-up: the full blocks of the
    `computed` tokens it has KV for, never the follow-up's last token."""
    return min(computed // block_size, (prompt_len - 1) // block_size) * block_size


@pytest.fixture(scope="module")
def per_token(tiny_llama_dir) -> int:
    return ModelConfig.from_pretrained(tiny_llama_dir).kv_bytes_per_token(4)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=BS)


@pytest.fixture(scope="module", params=list(TransportKind), ids=lambda k: k.value)
def pair(request, tiny_llama_dir):
    kind = request.param
    p = PrefillWorker(replace(worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p"),
                              transport=kind))
    d = DecodeWorker(replace(worker_config(WorkerRole.DECODE, tiny_llama_dir, "d"),
                             transport=kind))
    yield kind.value, p, d
    p.close()
    d.close()


def assert_no_references(*workers) -> None:
    """Every block free and unreferenced (cached ones may stay cached)."""
    for w in workers:
        wait_idle(w)
        bm = w.engine.block_manager
        assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_a_second_turn_sends_only_what_the_decode_worker_lacks(pair, collector, llm,
                                                              per_token):
    name, p, d = pair
    first, r1, bytes1 = run(collector, p, d, f"{name}-turn-1", FIRST)
    second_prompt = FIRST + first + _tokens(2, 10)
    second, r2, bytes2 = run(collector, p, d, f"{name}-turn-2", second_prompt)
    assert [first, second] == [o.token_ids for o in llm.generate(
        [FIRST, second_prompt], greedy(MAX_TOKENS))]
    assert r1.num_cached_tokens == 0 and bytes1 == len(FIRST) * per_token
    # the decode worker computed the first prompt and every answer token but the last
    shared = cached_after(len(FIRST) + len(first) - 1, len(second_prompt))
    assert r2.num_cached_tokens == shared == 52  # 13 of the 15 full blocks of 63 tokens
    assert bytes2 == (len(second_prompt) - shared) * per_token
    assert len(second_prompt) * per_token - bytes2 == shared * per_token
    assert_no_references(p, d)


@pytest.mark.parametrize("extra", [1, 0], ids=["one-token-tail", "last-block-full"])
def test_a_prompt_the_decode_worker_holds_but_its_tail_sends_the_tail(pair, collector, llm,
                                                                     per_token, extra):
    """Everything cached but the last partial block (or, for a whole number of blocks, the
    last block, since the last token must be sent): only that travels."""
    name, p, d = pair
    context = _tokens(3 + extra, 40)  # 10 blocks
    warm, _, _ = run(collector, p, d, f"{name}-warm-{extra}", context, max_tokens=1)
    prompt = context[:36 + extra] if extra else context[:36]
    out, reservation, sent = run(collector, p, d, f"{name}-tail-{extra}", prompt)
    assert reservation.num_cached_tokens == (36 if extra else 32)
    assert sent == (len(prompt) - reservation.num_cached_tokens) * per_token
    assert out == llm.generate([prompt], greedy(MAX_TOKENS))[0].token_ids
    assert_no_references(p, d)


@pytest.mark.slow
def test_smollm2_multi_turn_chat_through_worker_processes(smollm2_dir, smollm2_llm):
    """The real model and its chat template, each worker in its own process, KV over ZMQ:
    the second turn's prompt is the first's, the answer and a new question."""
    tok = smollm2_llm.tokenizer
    per_token = ModelConfig.from_pretrained(smollm2_dir).kv_bytes_per_token(4)
    kw = dict(block_size=16, num_blocks=256, max_num_batched_tokens=512)
    procs = spawn([worker_config(WorkerRole.PREFILL, smollm2_dir, "p", **kw),
                   worker_config(WorkerRole.DECODE, smollm2_dir, "d", **kw)])
    collector = StreamCollector()
    try:
        p, d = (proc.worker for proc in procs)
        chat = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name three primary colours."}]
        prompt1 = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
        answer, r1, bytes1 = run(collector, p, d, "smol-1", prompt1, max_tokens=24)
        chat += [{"role": "assistant", "content": tok.decode(answer)},
                 {"role": "user", "content": "And three secondary ones?"}]
        prompt2 = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
        second, r2, bytes2 = run(collector, p, d, "smol-2", prompt2, max_tokens=24)
        expected = smollm2_llm.generate([prompt1, prompt2], greedy(24))
        assert [answer, second] == [o.token_ids for o in expected]
        # the shared leading full blocks of the two prompts (the template may re-encode
        # the answer, so the prefix is measured, not assumed)
        common = next((i for i, (a, b) in enumerate(zip(prompt1 + answer, prompt2,
                                                        strict=False)) if a != b),
                      min(len(prompt1) + len(answer), len(prompt2)))
        shared = cached_after(min(common, len(prompt1) + len(answer) - 1), len(prompt2), 16)
        assert r1.num_cached_tokens == 0 and bytes1 == len(prompt1) * per_token
        assert r2.num_cached_tokens == shared >= 16 * (len(prompt1) // 16)
        assert bytes2 == (len(prompt2) - shared) * per_token
        for w in (p, d):
            wait_idle(w)
    finally:
        collector.close()
        stop_all(procs)
