"""The engine against this machine's roofline: how far each decode and prefill step is from
the physical limit it is bound by, measured side by side in one run.

Three roofs, measured now with the engine's torch threads:
- compute: the achieved FLOP/s of a large fp32 GEMM (torch.mm, `--gemm-n` square, best
  of 5), the most this CPU's cores do with the library the engine's linears use;
- bandwidth: STREAM "copy" (bench.decode_floor.copy_bandwidth: bytes read + written per
  second, best of 5), the most its memory moves;
- read: a sum over 512 MB (bench.decode_floor.read_bandwidth, best of 5), the most a
  stream that only reads (a decode step's weights and KV) can reach.
For each step, two floors: its bytes (every weight once, and the KV it reads) at the
bandwidth roof, and its FLOPs (2 per parameter per token computed, the LM head only for
the tokens sampled; attention's QK^T and PV, 4 x head_dim per (query, key) pair per head
and layer) at the compute roof. The step is bound by the larger: its ratio to that floor
is how far from the machine's limit it runs (1.0: at it). Where a decode step's time
goes: its linear layers (profiled self time) against their own floor (the weights at the
read roof, or their FLOPs at the GEMM roof), its attention against the KV at the read roof,
and the rest of the step (other ops and the framework between them), which has no floor.

- decode: batch 1-64, each sequence with a `--prompt-len`-token prompt, the median of
  `--steps` decode-only steps (bench.decode_floor.measure, with its profile of the step);
- prefill: one prompt of each `--prefill-lens` length, computed in one step (the chunk
  budget is set to hold it), the median of `--repeats` runs, prefix caching off.

    .venv/bin/python -m pdserve.bench.roofline --json bench/results/roofline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pdserve.bench.costmodel.machine import matmul_flops
from pdserve.bench.decode_floor import copy_bandwidth, measure, read_bandwidth, weight_bytes
from pdserve.engine import LLM, ModelConfig, SamplingParams


def head_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


def step_flops(cfg: ModelConfig, tokens: int, sampled: int, pairs: int) -> float:
    """FLOPs of a step computing `tokens` tokens, `sampled` of them through the LM head,
    with `pairs` (query, key) attention pairs in all."""
    body = weight_bytes(cfg) // 4 - head_params(cfg)
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs
    return 2 * body * tokens + 2 * head_params(cfg) * sampled + attention


def bound(step_s: float, bytes_: float, flops: float, roofs: dict) -> dict:
    memory_s = bytes_ / roofs["bandwidth_Bps"]
    compute_s = flops / roofs["gemm_flops"]
    floor = max(memory_s, compute_s)
    return {"step_ms": step_s * 1e3, "memory_floor_ms": memory_s * 1e3,
            "compute_floor_ms": compute_s * 1e3,
            "bound_by": "memory" if memory_s >= compute_s else "compute",
            "ratio_to_roof": step_s / floor}


def parts(m: dict, weights: float, kv: float, linear_flops: float, roofs: dict) -> dict:
    """A decode step's profiled linear and attention time against their own floors."""
    linear_ms = m["profile_ms"].get("linear", 0.0)
    attention_ms = m["profile_ms"].get("attention", 0.0)
    linear_floor_ms = max(weights / roofs["read_Bps"], linear_flops / roofs["gemm_flops"]) * 1e3
    attention_floor_ms = kv / roofs["read_Bps"] * 1e3
    return {"linear_ms": linear_ms, "linear_floor_ms": linear_floor_ms,
            "attention_ms": attention_ms, "attention_floor_ms": attention_floor_ms,
            "rest_ms": max(0.0, m["step_ms"] - linear_ms - attention_ms),
            "read_floor_ms": (weights + kv) / roofs["read_Bps"] * 1e3}


def decode_rows(llm: LLM, batches, prompt_len: int, steps: int, roofs: dict) -> list[dict]:
    cfg = llm.engine.config.model
    rows = []
    for b in batches:
        m = measure(llm, b, prompt_len, steps)
        context = m["mean_context"]
        kv = b * context * cfg.kv_bytes_per_token(4)
        row = {"batch": b, "mean_context": context, "profile_ms": m["profile_ms"],
               **bound(m["step_ms"] / 1e3, weight_bytes(cfg) + kv,
                       step_flops(cfg, b, b, int(b * context)), roofs),
               **parts(m, weight_bytes(cfg), kv, step_flops(cfg, b, b, 0), roofs)}
        rows.append(row)
        log(f"decode batch {b}: {row['step_ms']:.1f} ms, {row['ratio_to_roof']:.2f}x its "
            f"{row['bound_by']} floor")
    return rows


def prefill_rows(model: str, lens, repeats: int, roofs: dict) -> list[dict]:
    rows = []
    for n in lens:
        llm = LLM(model, kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False,
                  max_num_batched_tokens=max(n, 2048))
        cfg, engine = llm.engine.config.model, llm.engine
        gen = torch.Generator().manual_seed(n)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        times = []
        for i in range(repeats + 1):  # the first warms the kernels for this length
            prompt = torch.randint(1000, 40000, (n,), generator=gen).tolist()
            engine.add_request(f"p{n}-{i}", prompt, params)
            t0 = time.perf_counter()
            while engine.has_work():
                engine.step()
            if i:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row = {"prompt_len": n, **bound(step_s, weight_bytes(cfg) + n * cfg.kv_bytes_per_token(4),
                                        step_flops(cfg, n, 1, n * (n + 1) // 2), roofs)}
        rows.append(row)
        log(f"prefill {n} tokens: {row['step_ms']:.1f} ms, {row['ratio_to_roof']:.2f}x its "
            f"{row['bound_by']} floor")
        del llm
    return rows


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    roofs = {"gemm_flops": matmul_flops(n=args.gemm_n), "bandwidth_Bps": copy_bandwidth(),
             "read_Bps": read_bandwidth(), "torch_threads": torch.get_num_threads(),
             "gemm_n": args.gemm_n}
    log(f"roofs: {roofs['gemm_flops'] / 1e9:.1f} GFLOP/s fp32 GEMM, "
        f"{roofs['bandwidth_Bps'] / 1e9:.1f} GB/s copy, {roofs['read_Bps'] / 1e9:.1f} GB/s "
        f"read, {roofs['torch_threads']} threads")
    llm = LLM(args.model, kv_cache_memory_bytes=2 << 30, enable_prefix_caching=False)
    decode = decode_rows(llm, args.batches, args.prompt_len, args.steps, roofs)
    del llm
    prefill = prefill_rows(args.model, args.prefill_lens, args.repeats, roofs)

    print(f"\n{'step':>14} {'ms':>8} {'memory floor':>13} {'compute floor':>14} "
          f"{'bound by':>9} {'x roof':>7}")
    for r in decode + prefill:
        name = (f"decode b={r['batch']}" if "batch" in r
                else f"prefill {r['prompt_len']}")
        print(f"{name:>14} {r['step_ms']:8.1f} {r['memory_floor_ms']:13.1f} "
              f"{r['compute_floor_ms']:14.1f} {r['bound_by']:>9} {r['ratio_to_roof']:6.2f}x")
    print(f"\n{'where it goes':>14} {'linear ms':>10} {'x floor':>8} {'attention ms':>13} "
          f"{'x floor':>8} {'rest ms':>8} {'step x read floor':>18}")
    for r in decode:
        print(f"{'decode b=' + str(r['batch']):>14} {r['linear_ms']:10.1f} "
              f"{r['linear_ms'] / r['linear_floor_ms']:7.2f}x {r['attention_ms']:13.1f} "
              f"{r['attention_ms'] / r['attention_floor_ms']:7.2f}x {r['rest_ms']:8.1f} "
              f"{r['step_ms'] / max(r['read_floor_ms'], r['compute_floor_ms']):17.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"roofs": roofs, "decode": decode,
                                         "prefill": prefill}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
