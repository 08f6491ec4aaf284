"""The roofline bench's arithmetic (bench.roofline): a step's FLOPs and bytes, and which
roof binds it, on a model shape worked out by hand."""

from __future__ import annotations

import pytest

from pdserve.bench.decode_floor import weight_bytes
from pdserve.bench.roofline import bound, parts, step_flops
from pdserve.engine import ModelConfig

# 2 layers, hidden 8, 2 heads of 4 (one KV head), MLP 16, vocabulary 10
CFG = ModelConfig("x", "llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5,
                  rope_theta=1e4, max_model_len=64)


def test_a_steps_flops_count_the_body_per_token_the_head_per_sample_and_attention():
    # per layer: q, o 8x8 each, k, v 8x4 each (128 + 64), MLP 3 x 8 x 16 = 384, norms 16
    body = 2 * (128 + 64 + 384 + 16) + 8  # + the final norm
    assert weight_bytes(CFG) // 4 == body + 80
    attention = 4 * 2 * 2 * 4 * 6  # 6 pairs
    assert step_flops(CFG, 3, 1, 6) == 2 * body * 3 + 2 * 80 + attention


def test_a_step_is_judged_against_the_larger_floor():
    roofs = {"gemm_flops": 1e9, "bandwidth_Bps": 1e9}
    memory = bound(0.004, bytes_=2e6, flops=1e6, roofs=roofs)  # 2 ms of bytes, 1 of FLOPs
    assert memory["bound_by"] == "memory" and memory["ratio_to_roof"] == pytest.approx(2.0)
    compute = bound(0.004, bytes_=1e6, flops=4e6, roofs=roofs)
    assert compute["bound_by"] == "compute" and compute["ratio_to_roof"] == pytest.approx(1.0)


def test_a_decode_steps_linears_and_attention_are_judged_against_their_own_floors():
    roofs = {"gemm_flops": 1e9, "read_Bps": 1e9}
    m = {"step_ms": 10.0, "profile_ms": {"linear": 6.0, "attention": 1.0, "other ops": 0.5}}
    # weights 3 ms at the read roof, their FLOPs 2 ms at the GEMM roof; KV 0.5 ms
    r = parts(m, weights=3e6, kv=0.5e6, linear_flops=2e6, roofs=roofs)
    assert r["linear_floor_ms"] == pytest.approx(3.0)
    assert r["attention_floor_ms"] == pytest.approx(0.5)
    assert r["rest_ms"] == pytest.approx(3.0)  # other ops and the framework between them
    assert r["read_floor_ms"] == pytest.approx(3.5)
    # at many rows the linears' FLOPs bind instead
    assert parts(m, 3e6, 0.5e6, 8e6, roofs)["linear_floor_ms"] == pytest.approx(8.0)
