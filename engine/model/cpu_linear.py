"""Linear layers for float32 CPU inference: one copy of each weight, the kernel picked by
the row count.

Decode runs a linear layer on a handful to a few dozen rows: memory-bound at first, then
compute-bound. The `small_gemm` C++ kernel (engine.cpu_kernels) reads the plain weight as
it is stored, streaming it once per call at close to the memory bandwidth and
register-blocked across rows: on this kind of CPU as fast as oneDNN's GEMM on a weight
packed into its blocked layout at 1-8 rows, within 0-25% of it at 16-64 (where the step is
compute-bound), and faster than torch's GEMM up to 32 rows, even with it at 64; prefill's
hundreds of rows go to torch's own GEMM on the same plain weight. oneDNN's packed copy,
which would have to sit beside the plain weight the kernel reads, is not made: the weights
are held once. Figures in bench/README.md ("Weights held once").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

# up to here the kernel is at least as fast as torch's GEMM; from 128 rows on torch's cache
# blocking wins (bench/README.md, "Weights held once")
SMALL_GEMM_MAX_ROWS = 64


class CpuLinear(nn.Module):
    """Holds `linear`'s weight itself (no copy when it is contiguous: a tied LM head keeps
    sharing the embedding's storage)."""

    def __init__(self, linear: nn.Linear, kernels: Any | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().contiguous()  # [out, in]
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [rows, in]
        if self.kernels is not None and x.shape[0] <= SMALL_GEMM_MAX_ROWS:
            with record_function("pdserve::small_gemm"):  # named in profiles
                return self.kernels.small_gemm(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def optimize_linears(model: nn.Module, kernels: Any | None) -> int:
    """Replace every float32 CPU `nn.Linear` in `model` by a `CpuLinear`; returns how many."""
    targets = [(parent, name, child)
               for parent in model.modules()
               for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    for parent, name, linear in targets:
        setattr(parent, name, CpuLinear(linear, kernels))
    return len(targets)
