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


# groups of 3 (SmolLM2's), 1, 8, 4, 7 and 10, head dims of 16 to 128, contexts of 1 to 94
# tokens across blocks, a batch of 6 and of 1
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 32), (9, 3, 64), (4, 4, 32), (8, 1, 32),
                                              (32, 8, 128), (14, 2, 72), (6, 2, 40), (20, 2, 16),
                                              (6, 2, 20)])
@pytest.mark.parametrize("batch", [6, 1])
def test_kernel_matches_sdpa(kernel, heads, kv_heads, d, batch):
    torch.manual_seed(0)
    bs, num_blocks = 4, 60
    k_cache = torch.randn(num_blocks, bs, kv_heads, d)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()
    seqs = [SeqSlice(12, 1, perm[0:4]),
            SeqSlice(1, 1, perm[4:5]), SeqSlice(30, 1, perm[5:13]),
            SeqSlice(7, 1, perm[13:15]), SeqSlice(16, 1, perm[15:20]),
            SeqSlice(93, 1, perm[20:44])][-batch:]
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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9, 64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n,k", [(200, 96), (13, 37), (4, 8), (1, 5), (40, 603)])
def test_small_gemm_matches_f_linear(kernel, rows, with_bias, n, k):
    """Every tile shape and remainder: weight rows not a multiple of the tile, K not a
    multiple of the vector width, a non-contiguous input."""
    torch.manual_seed(rows * 1000 + n)
    x, w = torch.randn(k, rows).t(), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    torch.testing.assert_close(kernel.small_gemm(x, w, b), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-4)


def test_small_gemm_rejects_mismatched_shapes(kernel):
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and a contiguous w"):
        kernel.small_gemm(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias of 4 floats"):
        kernel.small_gemm(torch.randn(2, 8), torch.randn(4, 8), torch.randn(3))


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


def test_a_build_is_in_progress_while_its_lock_is_young(tmp_path, monkeypatch):
    import os

    from pdserve.engine.cpu_kernels import STALE_LOCK_S, build_dir, build_in_progress
    from pdserve.models.registry import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert not build_in_progress()  # no build folder yet
    build_dir().mkdir(parents=True)
    lock = build_dir() / "lock"
    lock.touch()
    assert build_in_progress()
    old = lock.stat().st_mtime - STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert not build_in_progress()  # a killed build's: nothing to wait for


def test_the_sources_copy_is_rewritten_only_where_it_differs(tmp_path):
    """Checkouts in other folders compile the same copy; a file whose content is unchanged
    keeps its time, so the build does not redo it."""
    from pdserve.engine.cpu_kernels import CSRC, SOURCES, _sources_copy

    src = _sources_copy(tmp_path / "src")
    for path in SOURCES:
        assert (src / path.name).read_bytes() == path.read_bytes()
    assert (src / "elementwise.h").is_file()  # the headers too
    kept = src / SOURCES[0].name
    stamp = kept.stat().st_mtime_ns
    stale = src / SOURCES[1].name
    stale.write_bytes(b"// another checkout's version\n")
    _sources_copy(tmp_path / "src")
    assert kept.stat().st_mtime_ns == stamp
    assert stale.read_bytes() == (CSRC / SOURCES[1].name).read_bytes()
    assert not [p for p in src.iterdir() if p.name.startswith(".")]  # no temporary left
