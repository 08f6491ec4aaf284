"""The paged KV cache tensors.

One K and one V tensor per engine, each `[num_layers, num_blocks, block_size, num_kv_heads,
head_dim]`. Token-major inside a block, which is the layout flash-attn's paged kernels read
and the layout the KV transfer wire format uses, so moving a token range is a plain gather.
Which request owns which block is the block manager's business, not this module's.
"""

from __future__ import annotations

import torch

from pdserve.engine.config import CacheConfig, CacheLayout, ModelConfig


def plan_layout(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> CacheLayout:
    """How many blocks the cache gets: `cache.num_blocks`, else as many as fit in
    `cache.memory_bytes`."""
    if cache.num_blocks is not None:
        return CacheLayout(cache.num_blocks, cache.block_size)
    element_size = torch.empty((), dtype=dtype).element_size()
    block_bytes = model.kv_bytes_per_token(element_size) * cache.block_size
    num_blocks = cache.memory_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"KV cache memory ({cache.memory_bytes} bytes) is smaller than one block "
            f"({block_bytes} bytes)"
        )
    return CacheLayout(int(num_blocks), cache.block_size)


class PagedKVCache:
    def __init__(
        self,
        layout: CacheLayout,
        model: ModelConfig,
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        self.layout = layout
        shape = (model.num_layers, layout.num_blocks, layout.block_size,
                 model.num_kv_heads, model.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer: `[num_blocks, block_size, num_kv_heads, head_dim]` each."""
        return self.k[index], self.v[index]
