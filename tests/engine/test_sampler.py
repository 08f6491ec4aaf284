"""Sampling: filters, and seeds that do not depend on the rest of the batch."""

from __future__ import annotations

import torch
from helpers import assert_no_leaks, greedy, make_engine, run_to_completion

from pdserve.engine import SamplingParams
from pdserve.engine.sampler import Sampler


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    ids = [f"r{i}" for i in range(6)]
    expect = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.0, top_k=1),
                   SamplingParams(temperature=1.0, top_p=1e-6)):
        assert sampler.sample(logits, ids, [params] * 6) == expect


def test_top_k_restricts_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = SamplingParams(temperature=5.0, top_k=2)
    seen = {sampler.sample(logits, ["r"], [params])[0] for _ in range(200)}
    assert seen == {0, 1}


def test_seeded_request_is_reproducible_across_batches(tiny_llama_dir):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = make_engine(tiny_llama_dir)
    alone.add_request("x", [3, 1, 4, 1, 5], params)
    out_alone = run_to_completion(alone)["x"]

    crowded = make_engine(tiny_llama_dir)
    crowded.add_request("noise", [9, 9, 9], SamplingParams(max_tokens=12, temperature=1.0))
    crowded.add_request("x", [3, 1, 4, 1, 5], params)
    crowded.add_request("g", [2, 7], greedy(5))
    assert run_to_completion(crowded)["x"] == out_alone
    assert_no_leaks(alone)
    assert_no_leaks(crowded)
