"""Roofline profiles of public GPUs: every figure has a source, the model shapes count to
their published parameter totals, and the numbers land where a roofline puts them (Llama
3.1 8B on one H100: a batch-1 decode step near 16 GB / 3.35 TB/s, a 2,048-token prefill in
tens of ms; 70B needs several GPUs)."""

from __future__ import annotations

import pytest

from pdserve.bench.costmodel.hardware import Assumptions, gpus, models, roofline
from pdserve.protocol.cost_profile import CostProfile, chunk_pairs


def test_every_gpu_and_model_cites_its_source():
    assert {"H100-SXM", "H200", "A100-SXM-80GB", "L40S"} <= set(gpus())
    assert {"llama-3.1-8b", "llama-3.1-70b", "smollm2-135m"} <= set(models())
    for g in gpus().values():
        assert g.source.startswith("https://") and g.network_source.startswith("https://")
        assert "assumption" in g.network_note
        assert g.bf16_dense_tflops > 0 and g.hbm_TBps > 0 and g.hbm_GB > 0
    for m in models().values():
        assert m.source.startswith("https://huggingface.co/")


def test_parameters_are_what_the_shapes_count():
    for m in models().values():
        assert m.parameters == m.counted_parameters, m.key
    assert models()["llama-3.1-8b"].parameters == pytest.approx(8.03e9, rel=1e-3)
    assert models()["llama-3.1-70b"].parameters == pytest.approx(70.6e9, rel=1e-3)


def test_llama_8b_on_one_h100_lands_on_the_roofline():
    p = roofline("H100-SXM", "llama-3.1-8b", tp=1)
    assert p.source == "roofline"
    # decode at batch 1: the weights streamed once, ~16 GB / 3.35 TB/s, a few ms
    decode = p.step.step_s(1, 0, 1024)
    assert 16e9 / 3.35e12 < decode < 3 * 16e9 / 3.35e12
    # 2,048 prompt tokens: 2 x 7.5 GFLOP per token at half of 989 TFLOPS, ~60-70 ms
    prefill = p.step.step_s(2048, chunk_pairs(0, 2048))
    assert 0.03 < prefill < 0.3
    assert 100 < p.step.knee_tokens < 400  # the ridge: compute-bound beyond a few hundred
    assert p.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert p.kv_capacity_tokens > 100_000
    assert p.transfer.bytes_per_s == pytest.approx(400e9 / 8 * 0.8)
    assert "assumptions" in p.sources and p.sources["gpu"].startswith("https://")


def test_tensor_parallel_splits_the_work_and_adds_all_reduce():
    one, four = roofline("H100-SXM", "llama-3.1-8b"), roofline("H100-SXM", "llama-3.1-8b", 4)
    assert four.step.floor_s == pytest.approx(one.step.floor_s / 4)
    assert four.step.token_s > one.step.token_s / 4  # + all-reduce bytes per token
    assert four.step.base_s > one.step.base_s  # + all-reduce latency
    assert four.kv_capacity_tokens > 4 * one.kv_capacity_tokens  # weights split too
    assert four.transfer.bytes_per_s == pytest.approx(4 * one.transfer.bytes_per_s)


def test_a_model_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        roofline("H100-SXM", "llama-3.1-70b", tp=1)
    assert roofline("H100-SXM", "llama-3.1-70b", tp=4).kv_capacity_tokens > 0
    with pytest.raises(ValueError, match="unknown GPU"):
        roofline("B300", "llama-3.1-8b")
    with pytest.raises(ValueError, match="tensor-parallel"):
        roofline("H100-SXM", "llama-3.1-8b", tp=0)
    with pytest.raises(ValueError, match="mfu"):
        Assumptions(mfu=1.5)


def test_every_roofline_profile_survives_its_json(tmp_path):
    for gpu in gpus():
        for model in models():
            for tp in (1, 2, 8):
                try:
                    p = roofline(gpu, model, tp)
                except ValueError:
                    continue  # too large for that many GPUs
                p.save(tmp_path / "p.json")
                assert CostProfile.load(tmp_path / "p.json") == p
