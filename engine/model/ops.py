"""Fused elementwise ops of the decoder: RMSNorm (plain and with the residual add), SiLU-and-mul
and rotary embedding.

Each has a torch reference implementation, used on GPU and wherever the C++ kernels are not
built, and a one-pass C++ kernel (engine.cpu_kernels) for float32 CPU tensors. Tests check
that both give the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class FusedOps:
    """The elementwise ops, bound to the kernels module (or None for torch ops only)."""

    def __init__(self, kernels: Any | None):
        self.kernels = kernels

    def _native(self, x: torch.Tensor) -> bool:
        return (self.kernels is not None and x.device.type == "cpu"
                and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._native(x):
            return self.kernels.rms_norm(x, weight, eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (rms_norm(x + residual), x + residual). May reuse the memory of both
        inputs: callers pass tensors they no longer need."""
        if self._native(x) and self._native(residual):
            self.kernels.fused_add_rms_norm(x, residual, weight, eps)
            return x, residual
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x `[rows, 2n]` = [gate | up] -> silu(gate) * up `[rows, n]`."""
        if self._native(x):
            return self.kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               head_dim: int) -> torch.Tensor:
        """Rotates the first `num_heads` heads of each row of x `[rows, >= num_heads *
        head_dim]` (NeoX halves) by cos/sin `[rows, head_dim / 2]`. In place when native;
        returns the tensor holding the result either way."""
        if self._native(x):
            self.kernels.rotary_embedding(x, cos, sin, num_heads, head_dim)
            return x
        width = num_heads * head_dim
        heads = x[:, :width].view(x.shape[0], num_heads, head_dim)
        lo, hi = heads.chunk(2, dim=-1)
        c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        rotated = torch.cat((lo * c - hi * s, hi * c + lo * s), dim=-1)
        return torch.cat((rotated.reshape(x.shape[0], width), x[:, width:]), dim=-1)
