"""The fused elementwise ops: C++ kernels against the torch reference, and the references
against the unfused formulas of the HF Llama code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.attention import SdpaBackend, SeqSlice
from pdserve.engine.cpu_kernels import cpu_kernels
from pdserve.engine.model.ops import FusedOps

REF = FusedOps(None)


@pytest.fixture(scope="module")
def native():
    k = cpu_kernels()
    if k is None:
        pytest.skip("the C++ kernels could not be built here")
    return FusedOps(k)


def hf_rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def hf_rope(x, cos, sin):  # x [rows, heads, d]; cos/sin [rows, d/2]
    c, s = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    half = x.shape[-1] // 2
    return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_rms_norm(native, rows):
    x, w = torch.randn(rows, 96), torch.randn(96)
    torch.testing.assert_close(REF.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5))
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("ops", ["ref", "native"])
def test_add_rms_norm_returns_norm_of_sum_and_sum(native, ops):
    impl = REF if ops == "ref" else native
    x, residual, w = torch.randn(9, 64), torch.randn(9, 64), torch.randn(64)
    expect_sum = x + residual
    expect = hf_rms_norm(expect_sum, w, 1e-6)
    out, new_residual = impl.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(new_residual, expect_sum)


@pytest.mark.parametrize("rows", [1, 3, 33])
def test_silu_and_mul(native, rows):
    x = torch.randn(rows, 2 * 40) * 4
    expect = F.silu(x[:, :40]) * x[:, 40:]
    torch.testing.assert_close(REF.silu_and_mul(x), expect)
    torch.testing.assert_close(native.silu_and_mul(x), expect)


@pytest.mark.parametrize("ops", ["ref", "native"])
def test_rotary_rotates_the_named_heads_and_leaves_the_rest(native, ops):
    impl = REF if ops == "ref" else native
    rows, heads, d, extra = 6, 5, 16, 24  # extra: v columns after the rotated q/k heads
    x = torch.randn(rows, heads * d + extra)
    angles = torch.rand(rows, d // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    expect_heads = hf_rope(x[:, :heads * d].view(rows, heads, d), cos, sin)
    out = impl.rotary(x.clone(), cos, sin, heads, d)
    torch.testing.assert_close(out[:, :heads * d].view(rows, heads, d), expect_heads)
    torch.testing.assert_close(out[:, heads * d:], x[:, heads * d:])


def test_rotary_honours_the_row_stride_of_a_column_slice(native):
    base = torch.randn(4, 50)
    view = base[:, 2:34]  # rows 50 floats apart
    angles = torch.rand(4, 8)
    expect = hf_rope(view.reshape(4, 2, 16), angles.cos(), angles.sin()).reshape(4, 32)
    native.rotary(view, angles.cos(), angles.sin(), 2, 16)
    torch.testing.assert_close(base[:, 2:34], expect)


def test_equal_length_prompts_batched_into_one_sdpa_call_match_one_by_one():
    torch.manual_seed(0)
    bs, heads, kv_heads, d = 4, 6, 2, 8
    lens = [5, 5, 5, 3, 5]
    n = sum(lens)
    q, k, v = torch.randn(n, heads, d), torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
    backend = SdpaBackend()
    seqs = [SeqSlice(0, ln, []) for ln in lens]
    meta = backend.build(seqs, bs, torch.device("cpu"))
    assert [p.num_seqs for p in meta.prefills] == [3, 1, 1]
    out = backend.forward(q, k, v, None, None, meta)
    start = 0
    for ln in lens:
        qs, ks, vs = (t[start:start + ln].transpose(0, 1)[None] for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[start:start + ln], ref[0].transpose(0, 1))
        start += ln
