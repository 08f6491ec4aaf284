"""Decode step time against the memory-bandwidth floor, and where the rest of the time goes.

A decode step must read every weight once and the KV of every running sequence once, so
    floor = (weight bytes + KV bytes read) / memory bandwidth.
Bandwidth is measured here as STREAM "copy" does it (a large tensor copy; bytes read plus
bytes written per second). For batch 1, 8 and 32 (256-token prompts) the script times
decode steps and profiles them into: linear layers, attention, KV gather, other tensor ops
and the remainder (Python and framework overhead between ops).

    .venv/bin/python -m pdserve.bench.decode_floor [--steps 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pdserve.engine import LLM, ModelConfig, SamplingParams

CATEGORIES = {
    "linear": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear",
               "small_gemm"),
    "attention": ("scaled_dot_product", "flash_attention", "paged_decode_attention"),
    "KV gather/write": ("aten::index", "aten::index_copy_"),
}


def copy_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """STREAM-copy bandwidth in bytes/s (read + write)."""
    src = torch.randn(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * num_bytes / min(times)


def read_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read-only streaming bandwidth in bytes/s: a sum over a tensor far larger than the
    caches. A decode step's weights are read, never written, so this, not copy's read +
    write, is the rate their stream can reach."""
    src = torch.randn(num_bytes // 4)
    src.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t0)
    return num_bytes / min(times)


def weight_bytes(cfg: ModelConfig) -> int:
    """Bytes of weights one decode step reads (embedding rows aside, everything once)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    per_layer = attn + 3 * h * i + 2 * h
    return 4 * (cfg.num_layers * per_layer + cfg.vocab_size * h + h)


def category(name: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other ops"


def measure(llm: LLM, batch: int, prompt_len: int, steps: int) -> dict:
    engine = llm.engine
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=2 * steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(1000, 40000, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params)
    while engine.stats().num_waiting or any(
            r.is_prefilling for r in engine.scheduler.running):
        engine.step()
    engine.step()  # first pure decode step: warm
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    context = statistics.mean(r.num_tokens for r in engine.scheduler.running)
    n_prof = max(4, steps // 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_prof):
            engine.step()
    by_cat: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        by_cat[category(evt.key)] += evt.self_cpu_time_total / 1e3 / n_prof  # ms per step
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    step_ms = statistics.median(times) * 1e3
    profiled_ms = sum(by_cat.values())
    return {"batch": batch, "step_ms": step_ms, "mean_context": context,
            "profile_ms": dict(by_cat), "profiled_step_ms": profiled_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    llm = LLM(args.model, kv_cache_memory_bytes=2 << 30, enable_prefix_caching=False)
    cfg = llm.engine.config.model
    bandwidth = copy_bandwidth()
    w_bytes = weight_bytes(cfg)
    rows = []
    for b in args.batches:
        r = measure(llm, b, args.prompt_len, args.steps)
        kv_bytes = b * r["mean_context"] * cfg.kv_bytes_per_token(4)
        r.update(weight_bytes=w_bytes, kv_bytes=kv_bytes,
                 floor_ms=(w_bytes + kv_bytes) / bandwidth * 1e3)
        r["ratio"] = r["step_ms"] / r["floor_ms"]
        rows.append(r)

    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write), weights "
          f"{w_bytes / 1e6:.0f} MB, torch threads {torch.get_num_threads()}")
    cats = list(CATEGORIES) + ["other ops"]
    print(f"{'batch':>5} {'step ms':>8} {'floor ms':>9} {'ratio':>6} | "
          + " ".join(f"{c:>15}" for c in cats) + f" {'overhead':>9}")
    for r in rows:
        prof = r["profile_ms"]
        overhead = max(0.0, r["step_ms"] - r["profiled_step_ms"])
        print(f"{r['batch']:5d} {r['step_ms']:8.1f} {r['floor_ms']:9.1f} {r['ratio']:5.2f}x | "
              + " ".join(f"{prof.get(c, 0.0):15.1f}" for c in cats) + f" {overhead:9.1f}")
    print("(profile columns: ms per step of op self-time; the profiler adds some overhead)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"copy_bandwidth_Bps": bandwidth, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
