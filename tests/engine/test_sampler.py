"""Sampling: filters, and seeds that do not depend on the rest of the batch."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_leaks, greedy, make_engine, run_to_completion

from pdserve.engine import SamplingParams
from pdserve.engine.sampler import SampleFailure, Sampler
from pdserve.protocol.sampling import SAMPLING_EPS


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


def _peaked_logits() -> torch.Tensor:
    """Rows like a real model's: logits in the tens, one clear winner per row."""
    torch.manual_seed(1)
    return 30.0 * torch.randn(4, 300)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-38),  # 30 / 1e-38 overflows float32: greedy instead
    SamplingParams(temperature=5e-324),
    SamplingParams(temperature=SAMPLING_EPS / 2, top_p=0.5, seed=3),
    SamplingParams(temperature=SAMPLING_EPS, seed=3),  # the floor itself samples, finitely
    SamplingParams(temperature=0.7, top_p=1e-300, seed=3),  # 0 in float32: keeps the top
    SamplingParams(temperature=0.7, top_p=5e-324, top_k=10**9, seed=3),
    SamplingParams(temperature=1.0, top_k=1),
])
def test_edge_parameters_sample_the_argmax(params):
    logits = _peaked_logits()
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    ids = [f"r{i}" for i in range(4)]
    assert sampler.sample(logits, ids, [params] * 4) == logits.argmax(-1).tolist()


def test_low_temperatures_are_computed_in_float32():
    """float16 logits divided by 1e-4 would overflow float16's range (65504)."""
    logits = _peaked_logits().half()
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = SamplingParams(temperature=1e-4, seed=5)
    assert sampler.sample(logits, ["a", "b", "c", "d"], [params] * 4) == (
        logits.float().argmax(-1).tolist())


def test_a_huge_temperature_samples_near_uniformly():
    logits = torch.tensor([[50.0, -50.0, 0.0, 10.0]])
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = SamplingParams(temperature=1e300)
    seen = {sampler.sample(logits, ["r"], [params])[0] for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_top_k_beyond_the_vocabulary_disables_it():
    logits = _peaked_logits()
    ids = ["a", "b", "c", "d"]
    off = Sampler(0, torch.device("cpu")).sample(logits, ids, [SamplingParams(seed=9)] * 4)
    big = Sampler(0, torch.device("cpu")).sample(
        logits, ids, [SamplingParams(seed=9, top_k=301)] * 4)
    assert off == big


@pytest.mark.parametrize("seed", [-(2**63), -1, 2**64 - 1])
def test_every_accepted_seed_draws(seed):
    logits = _peaked_logits()
    out = Sampler(0, torch.device("cpu")).sample(logits[:1], ["r"], [SamplingParams(seed=seed)])
    assert 0 <= out[0] < 300


def test_a_row_of_nan_or_inf_fails_alone():
    logits = _peaked_logits()
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    ids = ["a", "b", "c", "d"]
    params = [greedy(1), SamplingParams(seed=1), greedy(1), SamplingParams(seed=2)]
    out = sampler.sample(logits, ids, params)
    assert out[1] == out[2] == SampleFailure("the logits hold NaN/inf")
    clean = Sampler(seed=0, device=torch.device("cpu")).sample(
        logits[[0, 3]], ["a", "d"], [params[0], params[3]])
    assert [out[0], out[3]] == clean


def test_an_exception_while_sampling_a_row_fails_that_row_alone(monkeypatch):
    logits = _peaked_logits()
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    sample_row = sampler._sample_row

    def failing(request_id, row, p):
        if request_id == "bad":
            raise RuntimeError("injected")
        return sample_row(request_id, row, p)

    monkeypatch.setattr(sampler, "_sample_row", failing)
    params = [SamplingParams(seed=s) for s in range(4)]
    out = sampler.sample(logits, ["a", "bad", "c", "d"], params)
    assert out[1] == SampleFailure("RuntimeError: injected")
    clean = Sampler(seed=0, device=torch.device("cpu")).sample(
        logits, ["a", "x", "c", "d"], params)
    assert [out[i] for i in (0, 2, 3)] == [clean[i] for i in (0, 2, 3)]
