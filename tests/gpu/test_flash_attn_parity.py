"""flash-attn against torch SDPA over the same paged cache (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import FlashAttentionBackend, SdpaBackend, SeqSlice

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mix", ["prefill", "prefix", "decode", "mixed"])
def test_flash_matches_sdpa(mix):
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    bs, heads, kv_heads, d, num_blocks = 256, 8, 2, 64, 16
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqs = {
        "prefill": [SeqSlice(0, 300, [3, 4]), SeqSlice(0, 17, [5])],
        "prefix": [SeqSlice(260, 100, [0, 1])],
        "decode": [SeqSlice(511, 1, [6, 7]), SeqSlice(40, 1, [8])],
        "mixed": [SeqSlice(0, 50, [9]), SeqSlice(300, 1, [10, 11]), SeqSlice(256, 30, [12, 13])],
    }[mix]
    n = sum(s.num_new for s in seqs)
    q = torch.randn(n, heads, d, device=dev, dtype=dtype)
    # the new tokens' K/V are the cache entries at their positions
    k = torch.cat([k_cache[s.block_ids].flatten(0, 1)[s.start:s.context_len] for s in seqs])
    v = torch.cat([v_cache[s.block_ids].flatten(0, 1)[s.start:s.context_len] for s in seqs])
    flash, sdpa = FlashAttentionBackend(), SdpaBackend()
    out_flash = flash.forward(q, k, v, k_cache, v_cache, flash.build(seqs, bs, dev))
    out_sdpa = sdpa.forward(q, k, v, k_cache, v_cache, sdpa.build(seqs, bs, dev))
    torch.testing.assert_close(out_flash.float(), out_sdpa.float(), atol=2e-2, rtol=2e-2)
