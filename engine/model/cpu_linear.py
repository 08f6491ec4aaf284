"""Linear layers with oneDNN pre-packed weights, for CPU inference.

PyTorch's default CPU linear (MKL sgemm on plain weights) is 1.3-1.5x slower on this kind
of CPU than oneDNN with weights reordered once into its blocked layout, for the small
batches of decode and for prefill alike (see bench/README.md). The packing runs once at
load time; a layer whose output disagrees with `F.linear` keeps the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` in `model` by a `PackedLinear`; returns how many."""
    if not onednn_available():
        return 0
    probe_gen = torch.Generator().manual_seed(0)
    targets = [(parent, name, child)
               for parent in model.modules()
               for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    count = 0
    for parent, name, linear in targets:
        packed = PackedLinear(linear)
        probe = torch.randn(3, linear.in_features, generator=probe_gen)
        with torch.inference_mode():
            if not torch.allclose(packed(probe), F.linear(probe, linear.weight, linear.bias),
                                  rtol=1e-4, atol=1e-4):
                continue
        setattr(parent, name, packed)
        count += 1
    return count
