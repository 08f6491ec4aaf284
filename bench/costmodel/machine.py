"""What a measured profile ran on, and this machine's own roofline: memory bandwidth and
matmul throughput with the same torch threads the engine used, so a measured step model
can be read as ratios (`roofline_ratios`) that carry over to the next machine.

- copy bandwidth: STREAM "copy" (bench.decode_floor.copy_bandwidth): bytes read + written
  per second copying a 512 MB tensor, best of 5.
- matmul FLOP/s: a 1024 x 1024 x 1024 fp32 matmul, best of 5.
Both take about a second.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone

import torch

from pdserve.bench.decode_floor import copy_bandwidth, weight_bytes
from pdserve.engine import ModelConfig

MATMUL_N = 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_flops(repeats: int = 5, n: int = MATMUL_N) -> float:
    """Achieved FLOP/s of an n x n x n fp32 matmul, best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def describe(threads: int, cores_usable: int) -> dict:
    """The machine as a profile records it, with its two probes (run now, on the cores and
    threads the engine's steps use)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": cores_usable,
            "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "memory_GB": round(memory / 1e9, 1),
            "copy_bandwidth_GBps": copy_bandwidth() / 1e9,
            "matmul_gflops": matmul_flops() / 1e9,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def model_fields(name: str, cfg: ModelConfig) -> dict:
    return {"name": name, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "parameters": weight_bytes(cfg) // 4, "dtype": "float32"}


def roofline_ratios(step, cfg: ModelConfig, machine: dict) -> dict:
    """Each fitted term over what this machine's probes say it would cost at best."""
    bandwidth = machine["copy_bandwidth_GBps"] * 1e9
    w_bytes = weight_bytes(cfg)
    ideal_floor = w_bytes / bandwidth
    ideal_token = 2 * (w_bytes // 4) / (machine["matmul_gflops"] * 1e9)
    ideal_context = cfg.kv_bytes_per_token(4) / bandwidth
    # QK^T and PV: 2 * head_dim FLOPs each per (query, key) pair per head and layer
    ideal_pair = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim / (
        machine["matmul_gflops"] * 1e9)
    return {"weight_bytes": w_bytes,
            "floor_over_weights_at_copy_bandwidth": step.floor_s / ideal_floor,
            # with no knee (floor_s = 0) the weights' streaming sits in base_s
            "base_plus_floor_over_weights_at_copy_bandwidth":
                (step.base_s + step.floor_s) / ideal_floor,
            "token_over_2params_at_matmul_flops": step.token_s / ideal_token,
            "pair_over_attention_flops_at_matmul_flops": step.pair_s / ideal_pair,
            "context_over_kv_at_copy_bandwidth": step.context_s / ideal_context,
            "note": "fitted term / (bytes or FLOPs at this machine's probed rate); "
                    "copy bandwidth counts bytes read + written (STREAM)"}
