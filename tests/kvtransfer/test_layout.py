"""Gather from one paged layout, scatter into another: the tokens arrive unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.kvtransfer.layout import HostScatter, gather_tokens, scatter_tokens, slot_index


def _cache(num_blocks, block_size, heads=3, dim=8):
    return torch.zeros(num_blocks, block_size, heads, dim)


@pytest.mark.parametrize(("src_bs", "dst_bs"), [(4, 4), (4, 16), (16, 4), (3, 5)])
def test_round_trip_between_block_sizes(src_bs, dst_bs):
    torch.manual_seed(0)
    n = 37
    src = torch.randn(40, src_bs, 3, 8)
    src_blocks = torch.randperm(40)[: -(-n // src_bs)].tolist()
    dst = _cache(40, dst_bs)
    dst_blocks = torch.randperm(40)[: -(-n // dst_bs)].tolist()
    # in uneven chunks, as chunked prefill sends them
    for start, end in [(0, 5), (5, 21), (21, 37)]:
        staged = gather_tokens(src, src_blocks, start, end)
        assert staged.shape == (end - start, 3, 8) and staged.is_contiguous()
        scatter_tokens(dst, dst_blocks, start, staged)
    torch.testing.assert_close(gather_tokens(dst, dst_blocks, 0, n),
                               gather_tokens(src, src_blocks, 0, n), rtol=0, atol=0)
    # nothing outside the destination's blocks was touched
    untouched = [b for b in range(40) if b not in dst_blocks]
    assert dst[untouched].abs().sum() == 0


def test_gather_into_a_staging_buffer():
    src = torch.randn(8, 4, 3, 8)
    staging = torch.empty(6, 3, 8)
    out = gather_tokens(src, [5, 2], 1, 7, out=staging)
    assert out.data_ptr() == staging.data_ptr()
    torch.testing.assert_close(staging[0], src[5, 1])
    torch.testing.assert_close(staging[5], src[2, 2])


def test_slot_index_and_range_errors():
    assert slot_index([3, 1], 4, 2, 6).tolist() == [14, 15, 4, 5]
    with pytest.raises(ValueError, match="exceeds 2 blocks of 4"):
        slot_index([3, 1], 4, 0, 9)
    with pytest.raises(ValueError, match="bad token range"):
        slot_index([3, 1], 4, 5, 2)
    with pytest.raises(ValueError, match="does not match"):
        scatter_tokens(_cache(4, 4), [0], 0, torch.zeros(2, 2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_scatter_writes_what_the_torch_path_writes(dtype):
    """Raw frame bytes (read-only, as a ZMQ frame's) into non-consecutive blocks, from a
    start that is not block-aligned, land where `scatter_tokens` puts the same tokens."""
    torch.manual_seed(1)
    layers, blocks, bs, heads, dim = 3, 12, 4, 3, 8
    k_ref, v_ref = (torch.zeros(layers, blocks, bs, heads, dim, dtype=dtype) for _ in range(2))
    k, v = torch.zeros_like(k_ref), torch.zeros_like(v_ref)
    assert HostScatter.fits(k, v, dtype) and not HostScatter.fits(k, v, torch.float16)
    host = HostScatter(k, v)
    table = np.array([7, 2, 9, 0], dtype=np.int64)
    for layer, start, end in [(0, 0, 5), (0, 5, 14), (2, 3, 16)]:
        kv = torch.randn(2, end - start, heads, dim).to(dtype)
        payload = bytes(kv.view(torch.uint8).numpy().tobytes())
        host.scatter(layer, host.slots(table, start, end), memoryview(payload))
        for ref, part in ((k_ref, kv[0]), (v_ref, kv[1])):
            scatter_tokens(ref[layer], table.tolist(), start, part)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert k.abs().sum() > 0
    untouched = [b for b in range(blocks) if b not in table]
    assert k[:, untouched].abs().sum() == 0 and v[:, untouched].abs().sum() == 0
