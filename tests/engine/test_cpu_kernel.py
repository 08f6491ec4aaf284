"""The CPU decode kernels against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine.attention import SdpaBackend, SeqSlice
from pdserve.engine.cpu_kernels import cpu_kernels


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels()
    if k is None:
        pytest.skip("the C++ kernel could not be built here")
    return k


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_kernel_matches_sdpa(kernel, heads, kv_heads):
    torch.manual_seed(0)
    bs, d, num_blocks = 4, 32, 40
    k_cache = torch.randn(num_blocks, bs, kv_heads, d)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()
    seqs = [SeqSlice(12, 1, perm[0:4]),
            SeqSlice(1, 1, perm[4:5]), SeqSlice(30, 1, perm[5:13]),
            SeqSlice(7, 1, perm[13:15])]
    q = torch.randn(len(seqs), heads, d)
    k = torch.stack([k_cache[s.block_ids].flatten(0, 1)[s.start] for s in seqs])
    v = torch.stack([v_cache[s.block_ids].flatten(0, 1)[s.start] for s in seqs])
    plain, fast = SdpaBackend(), SdpaBackend(decode_kernel=kernel)
    dev = torch.device("cpu")
    ref = plain.forward(q, k, v, k_cache, v_cache, plain.build(seqs, bs, dev))
    out = fast.forward(q, k, v, k_cache, v_cache, fast.build(seqs, bs, dev))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_a_context_longer_than_its_blocks(kernel):
    k_cache = torch.randn(4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="context length"):
        kernel.paged_decode_attention(torch.randn(1, 1, 8), k_cache, k_cache.clone(),
                                      torch.tensor([[0]]), torch.tensor([5]), 1.0)


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_f_linear(kernel, rows, with_bias):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 96), torch.randn(200, 96)
    b = torch.randn(200) if with_bias else None
    torch.testing.assert_close(kernel.skinny_linear(x, w, b), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-4)


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path):
    """torch's loader waits without end on a build's lock file: one older than any build
    (a build killed midway) is removed, a recent one (a build in progress) is not."""
    import os

    from pdserve.engine.cpu_kernels import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "lock"
    assert not clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()
    old = lock.stat().st_mtime - STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()
