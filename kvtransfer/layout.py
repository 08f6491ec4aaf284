"""Gather a sequence's tokens out of a paged KV cache layer, and scatter them back in.

The wire unit is token-major `[tokens, kv_heads, head_dim]` (DESIGN §3), independent of
block size, so a sender and a receiver may page their caches differently. A cache layer
is `[num_blocks, block_size, kv_heads, head_dim]`.

`HostScatter` writes a frame's bytes straight into a host cache through numpy: torch's
`index_copy_` moves token rows of a few hundred bytes at ~4 GB/s on this kind of CPU,
numpy's row assignment near memcpy speed (bench/README.md, "KV transfer"), and numpy reads
the read-only buffer a ZMQ frame arrives in without the copy torch would need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def slot_index(block_ids: Sequence[int] | torch.Tensor, block_size: int, start: int, end: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of token positions [start, end).
    `block_ids` may be a long tensor already on `device` (callers that reuse a table)."""
    if not 0 <= start <= end:
        raise ValueError(f"bad token range [{start}, {end})")
    if end > len(block_ids) * block_size:
        raise ValueError(f"token range [{start}, {end}) exceeds {len(block_ids)} blocks of "
                         f"{block_size}")
    positions = torch.arange(start, end, device=device)
    if isinstance(block_ids, torch.Tensor):
        table = block_ids.to(device=device, dtype=torch.long)
    else:
        table = torch.as_tensor(list(block_ids), dtype=torch.long, device=device)
    return table[positions // block_size] * block_size + positions % block_size


def gather_tokens(layer: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, start: int,
                  end: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens [start, end) of one cache layer as `[tokens, kv_heads, head_dim]`.

    Writes into `out` (a staging buffer of that shape) when given, else allocates.
    """
    idx = slot_index(block_ids, layer.shape[1], start, end, layer.device)
    flat = layer.flatten(0, 1)  # [num_blocks * block_size, kv_heads, head_dim]
    if out is None:
        return flat.index_select(0, idx)
    return torch.index_select(flat, 0, idx, out=out)


def scatter_tokens(layer: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, start: int,
                   tokens: torch.Tensor) -> None:
    """Write `tokens` `[n, kv_heads, head_dim]` at positions [start, start + n)."""
    if tokens.shape[1:] != layer.shape[2:]:
        raise ValueError(f"token shape {tuple(tokens.shape[1:])} does not match the cache's "
                         f"{tuple(layer.shape[2:])}")
    idx = slot_index(block_ids, layer.shape[1], start, start + tokens.shape[0], layer.device)
    layer.flatten(0, 1).index_copy_(0, idx, tokens.to(device=layer.device, dtype=layer.dtype))


class HostScatter:
    """Scatter of raw frame bytes into one host KV cache pair, for transfers whose blocks
    hold their positions from slot 0 of the first block on.

    Made once per receiver: it keeps uint8 numpy views of the caches (`[num_layers,
    num_blocks * block_size, token_bytes]`), so each frame costs one slot computation and
    two row assignments, no allocation of the payload's size. Only for CPU caches whose
    dtype is the wire's (`fits`); callers use `scatter_tokens` otherwise."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        layers, blocks, self.block_size = k_cache.shape[:3]
        self.token_bytes = k_cache[0, 0, 0].numel() * k_cache.element_size()
        self._k, self._v = (c.view(torch.uint8).numpy().reshape(layers, blocks * self.block_size,
                                                               self.token_bytes)
                            for c in (k_cache, v_cache))

    @staticmethod
    def fits(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> bool:
        return all(c.device.type == "cpu" and c.dtype == dtype and c.is_contiguous()
                   and not c.requires_grad for c in (k_cache, v_cache))

    def slots(self, table: np.ndarray, start: int, end: int) -> np.ndarray:
        """Cache rows of positions [start, end) counted from the first block of `table`."""
        positions = np.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def scatter(self, layer: int, rows: np.ndarray, payload) -> None:
        """Write `payload` (K then V, token-major, `len(rows)` tokens; any buffer, read-only
        too) into `rows` of `layer`."""
        kv = np.frombuffer(payload, dtype=np.uint8).reshape(2, len(rows), self.token_bytes)
        self._k[layer][rows] = kv[0]
        self._v[layer][rows] = kv[1]
