"""Gather a sequence's tokens out of a paged KV cache layer, and scatter them back in.

The wire unit is token-major `[tokens, kv_heads, head_dim]` (DESIGN §3), independent of
block size, so a sender and a receiver may page their caches differently. Pure torch; a
cache layer is `[num_blocks, block_size, kv_heads, head_dim]`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
