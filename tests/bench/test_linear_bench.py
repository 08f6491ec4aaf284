"""The linear-kernel bench (bench.linear) measures what it says: every linear weight of the
model once, each path at each row count, and a fresh engine process's memory."""

from __future__ import annotations

import pytest

from pdserve.bench.linear import engine_steps, kernels, memory, weights


@pytest.fixture(scope="module")
def model_weights():
    return weights("smollm2-135m")


def test_the_stack_is_every_linear_weight_held_once(model_weights):
    # 30 layers x (fused qkv, o, fused gate-up, down) + the LM head tied to the embedding
    assert len(model_weights) == 30 * 4 + 1
    assert len({w.data_ptr() for w in model_weights}) == len(model_weights)
    assert sum(w.numel() for w in model_weights) * 4 > 500 << 20  # past any cache


def test_each_path_is_timed_at_each_row_count():
    rows = kernels("smollm2-135m", [1, 65], repeats=1, progress=lambda row: None)
    assert [r["rows"] for r in rows] == [1, 65]
    for r in rows:
        assert {"F.linear", "small_gemm"} <= set(r)
        assert all(v["ms"] > 0 and v["weight_gb_s"] > 0 for k, v in r.items() if k != "rows")


def test_memory_is_read_after_loading_and_after_a_batch():
    mem = memory("smollm2-135m")
    assert 0 < mem["rss_loaded_mb"] <= mem["rss_after_batch_mb"]


def test_the_engine_is_timed_beside_its_packed_twin_and_left_as_it_was():
    from pdserve.engine.model.cpu_linear import CpuLinear

    forward = CpuLinear.forward
    rows = engine_steps("smollm2-135m", [2], [24], repeats=2, progress=lambda row: None)
    assert [r["step"] for r in rows] == ["decode b=2", "prefill 24"]
    assert all(r["engine_ms"] > 0 and r["onednn_packed_ms"] > 0 for r in rows)
    assert CpuLinear.forward is forward
