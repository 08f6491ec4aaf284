"""The real model through 1P1D and the colocated worker in separate processes: the same
greedy tokens as engine.LLM (itself checked against transformers in tests/engine)."""

from __future__ import annotations

import pytest
from driver import run_colocated, run_many
from helpers import greedy
from worker_driver import wait_idle
from worker_procs import spawn, stop_all, worker_config

from pdserve.bench.stream_collector import StreamCollector
from pdserve.protocol import WorkerRole

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue."]


def test_smollm2_through_workers_equals_llm(smollm2_dir, smollm2_llm):
    tok = smollm2_llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    expected = [o.token_ids for o in smollm2_llm.generate(prompts, greedy(24))]
    kw = dict(block_size=16, num_blocks=128, max_num_batched_tokens=512)
    procs = spawn([worker_config(role, smollm2_dir, role.value, **kw) for role in WorkerRole])
    collector = StreamCollector()
    try:
        p, d, c = (proc.worker for proc in procs)
        outs = run_many(collector, [p], [d], prompts, greedy(24), "smol")
        assert [o.token_ids for o in outs] == expected
        colocated = [run_colocated(collector, c, f"smol-co-{i}", pr, greedy(24))
                     for i, pr in enumerate(prompts)]
        assert [o.token_ids for o in colocated] == expected
        for w in (p, d, c):
            wait_idle(w)
    finally:
        collector.close()
        stop_all(procs)
