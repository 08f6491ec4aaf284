"""Roofline cost profiles of public GPUs: what an engine step, a KV transfer and the KV cache
would cost for a Llama-family model on NVIDIA GPUs, from datasheet figures (`gpus.json`),
published model shapes (`models.json`) and named efficiencies (`Assumptions`).

Contract: `roofline(gpu, model, tp)` returns a CostProfile with `source="roofline"` for one
worker: a tensor-parallel group of `tp` GPUs running the model in bf16. Every figure it used
is in the profile's `sources`, with its URL or marked an assumption. It reads files shipped
with the package and imports no torch.

The step model's terms (per GPU of the group: the group splits each matmul and each
attention head set `tp` ways; norms and embeddings, replicated, are ignored):
- floor_s   = weight bytes one step streams (the matmuls' weights; the input embedding is
              gathered row by row, not streamed) / tp / (HBM bandwidth * bandwidth_efficiency)
- token_s   = 2 * matmul parameters / tp / (peak * mfu)
              + for tp > 1 the all-reduce bytes per token: two ring all-reduces per layer
              (after attention and after the MLP) of hidden * 2 bytes, each moving
              2 (tp - 1) / tp of it over one direction of the GPU link * link_efficiency
- pair_s    = 4 * layers * heads * head_dim / tp / (peak * attention_efficiency): QK^T and
              PV, 2 * head_dim FLOPs each per (query, key) pair per head
- context_s = KV bytes per token on one GPU / (HBM bandwidth * bandwidth_efficiency)
- base_s    = step_overhead_s (scheduling, sampling, launches) + for tp > 1 the all-reduce
              latency: 2 * layers * allreduce_latency_s
KV capacity: (tp * HBM * usable_memory - weight bytes) / KV bytes per token of the group (KV
heads are replicated where tp exceeds them). A transfer: transfer_latency_s + bytes /
(tp * network bandwidth * network_efficiency): each GPU sends its shard over its own NIC.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path

from pdserve.protocol.cost_profile import CostProfile, StepModel, TransferModel

HERE = Path(__file__).parent
DTYPE_BYTES = 2  # bf16


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    bf16_dense_tflops: float
    hbm_TBps: float
    hbm_GB: float
    link: str
    link_GBps: float  # both directions together
    network_gbps: float  # an assumption (network_note)
    network_note: str
    source: str
    network_source: str


@dataclass(frozen=True)
class ModelShape:
    key: str
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    parameters: int  # as models.json records it
    source: str

    @property
    def counted_parameters(self) -> int:
        """Parameters counted from the shapes (no biases: Llama has none)."""
        h, d = self.hidden, self.head_dim
        attn = h * d * (2 * self.heads + 2 * self.kv_heads)
        layer = attn + 3 * h * self.intermediate + 2 * h  # q, k, v, o; gate, up, down; norms
        embeddings = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + h

    @property
    def matmul_parameters(self) -> int:
        """The parameters a step streams through matmuls: all but an untied input embedding."""
        return self.parameters - (0 if self.tied_embeddings else self.vocab * self.hidden)

    def kv_bytes_per_token(self, dtype_bytes: int = DTYPE_BYTES) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Assumptions:
    """What no datasheet says; each goes into the profile's sources as an assumption."""

    mfu: float = 0.5  # share of peak the linear layers reach once compute-bound
    attention_efficiency: float = 0.4  # share of peak prefill attention reaches
    bandwidth_efficiency: float = 0.8  # share of HBM bandwidth streaming weights / KV reaches
    link_efficiency: float = 0.8  # share of one link direction an all-reduce reaches
    network_efficiency: float = 0.8  # share of the NIC's line rate a KV transfer reaches
    usable_memory: float = 0.9  # share of HBM for weights + KV (activations, runtime: rest)
    step_overhead_s: float = 1e-3  # per step: scheduler, sampler, kernel launches
    allreduce_latency_s: float = 10e-6  # per all-reduce, small messages
    transfer_latency_s: float = 0.5e-3  # per KV transfer: connection, handshake, completion
    router_s: float = 2e-3  # the router's path per request (a CPU figure: measure yours)
    stream_s: float = 1e-3  # a token's trip from the decode worker to the client

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0 or (f.name.endswith(("efficiency", "mfu", "memory"))
                                  and not 0 < value <= 1):
                raise ValueError(f"assumption {f.name} = {value} is out of range")


@cache
def gpus() -> dict[str, Gpu]:
    raw = json.loads((HERE / "gpus.json").read_text())["gpus"]
    return {key: Gpu(key=key, **entry) for key, entry in raw.items()}


@cache
def models() -> dict[str, ModelShape]:
    raw = json.loads((HERE / "models.json").read_text())["models"]
    return {key: ModelShape(key=key, **entry) for key, entry in raw.items()}


def _lookup(table: dict, key: str, what: str):
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; known: {', '.join(table)}")
    return table[key]


def roofline(gpu: str, model: str, tp: int = 1,
             assume: Assumptions = Assumptions()) -> CostProfile:
    """The roofline profile of `model` on `tp` GPUs of kind `gpu` (keys of `gpus()` and
    `models()`). Raises ValueError for unknown names, a tp that does not split the heads, or
    weights that do not fit."""
    g, m = _lookup(gpus(), gpu, "GPU"), _lookup(models(), model, "model")
    if tp < 1 or m.heads % tp:
        raise ValueError(f"tensor-parallel degree must be >= 1 and divide the model's "
                         f"{m.heads} attention heads, got {tp}")
    peak = g.bf16_dense_tflops * 1e12
    hbm_bps = g.hbm_TBps * 1e12 * assume.bandwidth_efficiency
    weight_bytes = m.parameters * DTYPE_BYTES
    # each GPU holds at least one KV head: beyond kv_heads GPUs, heads are replicated
    kv_heads_per_gpu = math.ceil(m.kv_heads / tp)
    kv_per_gpu = 2 * m.layers * kv_heads_per_gpu * m.head_dim * DTYPE_BYTES
    usable = g.hbm_GB * 1e9 * assume.usable_memory
    kv_capacity = int((tp * usable - weight_bytes) / (tp * kv_per_gpu))
    if kv_capacity <= 0:
        raise ValueError(f"{m.name} ({weight_bytes / 1e9:.0f} GB in bf16) does not fit on "
                         f"{tp} x {g.key} ({tp * usable / 1e9:.0f} GB usable): raise --tp")
    allreduce_s = 0.0
    base_s = assume.step_overhead_s
    if tp > 1:
        link_one_way = g.link_GBps / 2 * 1e9 * assume.link_efficiency
        per_token_bytes = 2 * m.layers * 2 * (tp - 1) / tp * m.hidden * DTYPE_BYTES
        allreduce_s = per_token_bytes / link_one_way
        base_s += 2 * m.layers * assume.allreduce_latency_s
    step = StepModel(
        base_s=base_s,
        floor_s=m.matmul_parameters * DTYPE_BYTES / tp / hbm_bps,
        token_s=2 * m.matmul_parameters / tp / (peak * assume.mfu) + allreduce_s,
        pair_s=4 * m.layers * m.heads * m.head_dim / tp / (peak * assume.attention_efficiency),
        context_s=kv_per_gpu / hbm_bps,
    )
    net_bps = tp * g.network_gbps / 8 * 1e9 * assume.network_efficiency
    return CostProfile(
        source="roofline",
        machine={"gpu": g.name, "gpu_key": g.key, "tensor_parallel": tp,
                 "bf16_dense_tflops": g.bf16_dense_tflops, "hbm_TBps": g.hbm_TBps,
                 "hbm_GB": g.hbm_GB, "link": g.link, "link_GBps": g.link_GBps,
                 "network_gbps": g.network_gbps},
        model={"name": m.name, "key": m.key, "layers": m.layers, "hidden_size": m.hidden,
               "heads": m.heads, "kv_heads": m.kv_heads, "head_dim": m.head_dim,
               "intermediate_size": m.intermediate, "vocab_size": m.vocab,
               "parameters": m.parameters, "dtype": "bfloat16"},
        kv_bytes_per_token=m.kv_bytes_per_token(),
        kv_capacity_tokens=kv_capacity,
        step=step,
        transfer=TransferModel(latency_s=assume.transfer_latency_s, bytes_per_s=net_bps),
        router_s=assume.router_s,
        stream_s=assume.stream_s,
        sources={"gpu": g.source, "network": f"{g.network_note} ({g.network_source})",
                 "model": m.source, "method": "roofline (bench/costmodel/hardware.py)",
                 "assumptions": asdict(assume),
                 "allreduce_s_per_token": allreduce_s},
    )
