"""Linear layers for float32 CPU inference, picking the fastest kernel for the row count.

PyTorch's default CPU linear (MKL sgemm on plain weights) is 1.3-1.5x slower on this kind
of CPU than oneDNN with weights reordered once into its blocked layout, for prefill and
batched decode alike. At 1-3 rows (decode at small batch) both stream the weights at about
a third of the memory bandwidth; the `skinny_linear` C++ kernel (engine.cpu_kernels) gets
close to all of it. Figures in bench/README.md.

A `CpuLinear` therefore keeps the plain weight (for the skinny kernel) and, where oneDNN is
available, a packed copy: on CPU the weights of the linear layers are held twice.
A layer whose packed output disagrees with `F.linear` keeps the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

SKINNY_MAX_ROWS = 3  # from 4 rows on, oneDNN's GEMM is as fast (bench/README.md)


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear, kernels: Any | None, pack: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().contiguous()  # [out, in]
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.kernels = kernels
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight) if pack else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [rows, in]
        if self.kernels is not None and x.shape[0] <= SKINNY_MAX_ROWS:
            with record_function("pdserve::skinny_linear"):  # named in profiles
                return self.kernels.skinny_linear(x, self.weight, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def optimize_linears(model: nn.Module, kernels: Any | None) -> int:
    """Replace every float32 CPU `nn.Linear` in `model` by a `CpuLinear`; returns how many."""
    can_pack = onednn_available()
    probe_gen = torch.Generator().manual_seed(0)
    targets = [(parent, name, child)
               for parent in model.modules()
               for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    for parent, name, linear in targets:
        fast = CpuLinear(linear, kernels, pack=can_pack)
        if fast.packed is not None:
            probe = torch.randn(SKINNY_MAX_ROWS + 2, linear.in_features, generator=probe_gen)
            with torch.inference_mode():
                if not torch.allclose(fast(probe), F.linear(probe, linear.weight, linear.bias),
                                      rtol=1e-4, atol=1e-4):
                    fast.packed = None
        setattr(parent, name, fast)
    return len(targets)
