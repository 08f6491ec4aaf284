"""Sender-side framing: one layer's token range as a control header plus a raw payload."""

from __future__ import annotations

import torch

from pdserve.kvtransfer.messages import ChunkHeader, checksum


def make_chunk(transfer_id: str, layer: int, start: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[ChunkHeader, memoryview]:
    """Copy K and V `[tokens, kv_heads, head_dim]` into one contiguous staging buffer (K then
    V) and describe it. The memoryview keeps the staging buffer alive."""
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must both be "
                         "[tokens, kv_heads, head_dim]")
    staging = torch.stack((k, v)).contiguous().cpu()  # [2, tokens, kv_heads, head_dim]
    payload = memoryview(staging.view(torch.uint8).numpy()).cast("B")
    header = ChunkHeader(transfer_id, layer, start, start + k.shape[0],
                         str(k.dtype).removeprefix("torch."), k.shape[1], k.shape[2],
                         checksum(payload))
    return header, payload
