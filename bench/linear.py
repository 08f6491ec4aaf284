"""The engine's linear layers, weights held once: the kernel of each row count against
the alternatives, and what an engine process holds.

- kernels: every linear weight of the loaded model (the real stack, far larger than the
  last-level cache, so each pass streams it from memory as a decode step does), run at
  `--rows` rows through `small_gemm` (the engine's path up to 64 rows), torch's `F.linear`
  (its path beyond) and oneDNN on a copy packed into its blocked layout (the path that
  held every weight twice; packed here only to compare), the three taking turns pass by
  pass; the median pass of `--repeats`, as time, weight GB/s and GFLOP/s.
- engine: decode steps at `--batches` (128-token prompts) and prefills of `--prefill-lens`
  tokens, the engine as it is against the same engine with every linear layer on oneDNN's
  packed copy, switching path step by step (decode) or prompt by prompt (prefill); medians.
- memory: a fresh engine process (`LLM`, a 64 MB KV cache) reports its resident memory
  after loading and after a fixed batch (8 prompts of 160 tokens, 32 tokens out).

To measure another checkout's memory beside this one, run this file under it
(`PYTHONPATH=<dir holding it as pdserve> python bench/linear.py --memory-only`).

    .venv/bin/python -m pdserve.bench.linear [--rows 1 2 4 8 16 32 64 128 256 512]
        [--repeats 7] [--batches 1 8 32 64] [--prefill-lens 512 2048] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def memory(model: str) -> dict:
    import psutil

    from pdserve.engine import LLM, SamplingParams

    proc = psutil.Process()
    t0 = time.perf_counter()
    llm = LLM(model, kv_cache_memory_bytes=64 << 20)
    load_s = time.perf_counter() - t0
    loaded = proc.memory_info().rss
    llm.generate([[1, 2, 3, 4 + i] * 40 for i in range(8)],
                 SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    return {"load_s": round(load_s, 2), "rss_loaded_mb": loaded >> 20,
            "rss_after_batch_mb": proc.memory_info().rss >> 20}


def weights(model: str) -> list[torch.Tensor]:
    from pdserve.engine import LLM
    from pdserve.engine.model.cpu_linear import CpuLinear

    llm = LLM(model, kv_cache_memory_bytes=16 << 20)
    mods = llm.engine.runner.model.modules()
    return [m.weight for m in mods if isinstance(m, CpuLinear)]


def kernels(model: str, rows: list[int], repeats: int, progress) -> list[dict]:
    from pdserve.engine.cpu_kernels import cpu_kernels

    kern = cpu_kernels()
    ws = weights(model)
    packed = ([torch.ops.mkldnn._reorder_linear_weight(w) for w in ws]
              if torch.backends.mkldnn.is_available() else None)
    nbytes = sum(w.numel() * 4 for w in ws)
    out = []
    for m in rows:
        xs = [torch.randn(m, w.shape[1]) for w in ws]
        paths = {"F.linear": lambda xs=xs: [F.linear(a, w) for a, w in zip(xs, ws, strict=True)]}
        if kern is not None:
            paths["small_gemm"] = lambda xs=xs: [kern.small_gemm(a, w, None)
                                                 for a, w in zip(xs, ws, strict=True)]
        if packed is not None:
            paths["onednn_packed"] = lambda xs=xs: [
                torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], "")
                for a, p in zip(xs, packed, strict=True)]
        times: dict[str, list[float]] = {k: [] for k in paths}
        with torch.inference_mode():
            for f in paths.values():
                f()
            for _ in range(repeats):
                for name, f in paths.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        row = {"rows": m}
        for name, ts in times.items():
            t = statistics.median(ts)
            row[name] = {"ms": round(t * 1e3, 2), "weight_gb_s": round(nbytes / t / 1e9, 1),
                         "gflop_s": round(2 * m * nbytes / 4 / t / 1e9, 1)}
        out.append(row)
        progress(row)
    return out


@contextlib.contextmanager
def packed_linears(model):
    """Every CpuLinear of `model` on a oneDNN copy packed for it, while inside."""
    from pdserve.engine.model.cpu_linear import CpuLinear

    packs = {id(m): torch.ops.mkldnn._reorder_linear_weight(m.weight)
             for m in model.modules() if isinstance(m, CpuLinear)}
    plain = CpuLinear.forward

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, packs[id(self)], self.bias, "none", [], "")

    CpuLinear.forward = forward
    try:
        yield
    finally:
        CpuLinear.forward = plain


def engine_steps(model: str, batches: list[int], prefill_lens: list[int], repeats: int,
                 progress) -> list[dict]:
    from pdserve.engine import LLM, SamplingParams

    llm = LLM(model, kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False,
              max_num_batched_tokens=max([2048, *prefill_lens]))
    engine, net = llm.engine, llm.engine.runner.model
    paths = {"engine": contextlib.nullcontext, "onednn_packed": lambda: packed_linears(net)}
    out = []
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        for i in range(b):
            engine.add_request(f"b{b}-{i}", torch.randint(1000, 40000, (128,), generator=gen)
                               .tolist(), SamplingParams(max_tokens=4 * repeats + 8,
                                                         temperature=0.0, ignore_eos=True))
        while engine.stats().num_waiting or any(r.is_prefilling for r in engine.scheduler.running):
            engine.step()
        times: dict[str, list[float]] = {k: [] for k in paths}
        for rep in range(repeats):
            for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
                with paths[name]():
                    engine.step()  # the other path's last step leaves the caches cold
                    t0 = time.perf_counter()
                    engine.step()
                    times[name].append(time.perf_counter() - t0)
        for rid in list(engine.scheduler.requests):
            engine.abort(rid)
        out.append(_ratio({"step": f"decode b={b}"}, times))
        progress(out[-1])
    rng = random.Random(0)
    for n in prefill_lens:
        times = {k: [] for k in paths}
        for _ in range(max(2, repeats // 2)):
            for name, path in paths.items():
                ids = [rng.randrange(1000, 40000) for _ in range(n)]
                with path():
                    t0 = time.perf_counter()
                    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
                    times[name].append(time.perf_counter() - t0)
        out.append(_ratio({"step": f"prefill {n}"}, times))
        progress(out[-1])
    return out


def _ratio(row: dict, times: dict[str, list[float]]) -> dict:
    for name, ts in times.items():
        row[f"{name}_ms"] = round(statistics.median(ts) * 1e3, 1)
    row["engine_over_packed"] = round(row["engine_ms"] / row["onednn_packed_ms"], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64])
    ap.add_argument("--prefill-lens", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--memory-only", action="store_true",
                    help="only the engine process's memory (JSON on stdout)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.memory_only:
        print(json.dumps(memory(args.model)))
        return 0
    # a fresh process: nothing this one allocates counts
    child = subprocess.run([sys.executable, __file__, "--memory-only", "--model", args.model],
                           check=True, capture_output=True, text=True)
    mem = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"engine process: {mem['rss_loaded_mb']} MB loaded, "
          f"{mem['rss_after_batch_mb']} MB after a batch", file=sys.stderr)

    def progress(row: dict) -> None:
        cells = "  ".join(f"{k} {v['ms']:8.2f} ms {v['weight_gb_s']:5.1f} GB/s"
                          for k, v in row.items() if k != "rows")
        print(f"{row['rows']:4d} rows  {cells}", file=sys.stderr)

    res = {"memory": mem, "threads": torch.get_num_threads(),
           "kernels": kernels(args.model, args.rows, args.repeats, progress)}
    if torch.backends.mkldnn.is_available():
        res["engine"] = engine_steps(args.model, args.batches, args.prefill_lens, args.repeats,
                                     lambda row: print(row, file=sys.stderr))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
