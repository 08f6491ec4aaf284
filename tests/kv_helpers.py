"""Shared pieces of the KV transport tests: a tiny KV spec, caches, a layer-by-layer send
and a bounded wait for a terminal result."""

from __future__ import annotations

import time

import torch
from pdserve.kvtransfer.base import KVSpec
from pdserve.kvtransfer.layout import gather_tokens

SPEC = KVSpec("tiny", num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def caches(num_blocks, block_size, fill=False):
    shape = (SPEC.num_layers, num_blocks, block_size, SPEC.num_kv_heads, SPEC.head_dim)
    return (torch.randn(shape), torch.randn(shape)) if fill else (torch.zeros(shape),
                                                                   torch.zeros(shape))


def wait_for(poll, timeout=5.0):
    """Poll until the transfer is terminal; the result."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = poll()
        if result.status.is_terminal:
            return result
        time.sleep(0.005)
    raise AssertionError(f"not terminal after {timeout}s: {poll()}")


def send_layers(sender, tid, p_cache, p_blocks, n, layers=None):
    pk, pv = p_cache
    for layer in range(SPEC.num_layers) if layers is None else layers:
        for start, end in ((0, n // 2), (n // 2, n)):
            sender.send_layer(tid, layer, start, gather_tokens(pk[layer], p_blocks, start, end),
                              gather_tokens(pv[layer], p_blocks, start, end))
