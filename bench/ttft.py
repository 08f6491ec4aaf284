"""TTFT at low load: one prefill + one decode worker against one colocated worker.

SmolLM2 (fp32), one request at a time, prompts of 128, 512 and 2,048 tokens (fresh random
token ids every run, so the prefix cache never hits), 8 output tokens (ignore_eos). Each
worker runs in its own process (deploy.local) on one core: the prefill worker on core 0,
the decode worker on core 1, the colocated worker on core 0, so both deployments prefill
with the same compute. Runs alternate between the deployments so drift hits both alike.

TTFT runs from the driver's first call (reserve, or generate) to the first token's arrival
at the driver (a bench.stream_collector on the router's side of the stream). Its stages
come from the workers' stamps (one clock, time.time()):
- disaggregated: reserve (until the decode worker applied it), prefill queue, prefill
  compute, KV transfer left on the critical path (prefill end until all KV is at the decode
  worker), decode admission (KV in until the first token is pushed), stream (push until
  arrival), and the driver's own gap between reserve and the prefill call;
- colocated: queue, prefill compute, stream.

    .venv/bin/python -m pdserve.bench.ttft [--lengths 128 512 2048] [--repeats 5]
                                           [--json PATH] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pdserve.bench.stream_collector import StreamCollector
from pdserve.deploy.local import WorkerProcess
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import ModelConfig, SamplingParams, resolve_model
from pdserve.kvtransfer.transports import TransportKind
from pdserve.protocol import DecodeOrder, PrefillOrder, PrefillStatus, WorkerRole

DISAGG_STAGES = ["reserve", "driver", "prefill queue", "prefill compute", "KV transfer",
                 "decode admission", "stream"]
OUTPUT_TOKENS = 8


def run_disaggregated(collector, prefill, decode, tid, prompt, params) -> dict[str, float]:
    t0 = time.time()
    reservation = decode.reserve(DecodeOrder(tid, prompt, params, collector.endpoint))
    t1 = time.time()
    prefill.submit(PrefillOrder(tid, prompt, params, reservation.kv_endpoint,
                                collector.endpoint, kv_start=reservation.num_cached_tokens))
    stream = collector.wait_final(tid)
    outcome = collector.wait_outcome(tid)
    if outcome.status is not PrefillStatus.DONE:
        raise RuntimeError(f"prefill of {tid} {outcome.status.value}: {outcome.reason}")
    ps, ds = outcome.stamps, stream.final.stamps
    return {"ttft": stream.arrivals[0] - t0,
            "reserve": ds.received - t0,
            "driver": ps.received - ds.received,  # reserve's reply, the submit's request
            "prefill queue": ps.prefill_start - ps.received,
            "prefill compute": ps.prefill_end - ps.prefill_start,
            "KV transfer": ds.kv_received - ps.prefill_end,
            "decode admission": ds.first_token - ds.kv_received,
            "stream": stream.arrivals[0] - ds.first_token,
            "kv_send_end_after_prefill": ps.kv_send_end - ps.prefill_end,
            "reserve_call": t1 - t0}


def run_colocated(collector, worker, tid, prompt, params) -> dict[str, float]:
    t0 = time.time()
    worker.generate(DecodeOrder(tid, prompt, params, collector.endpoint))
    stream = collector.wait_final(tid)
    s = stream.final.stamps
    return {"ttft": stream.arrivals[0] - t0,
            "queue": s.prefill_start - t0,
            "prefill compute": s.prefill_end - s.prefill_start,
            "stream": stream.arrivals[0] - s.first_token}


def median_ms(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}


def plot(result: dict, path: Path) -> None:
    """Left: median TTFT of both deployments per prompt length. Right: what 1P1D adds on top
    of the colocated TTFT, stage by stage (the prefill's slowdown while it sends included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [str(n) for n in result["lengths"]]
    coloc = [result["colocated"][n] for n in lengths]
    disagg = [result["disaggregated"][n] for n in lengths]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = range(len(lengths))
    left.bar([i - 0.2 for i in x], [c["ttft"] for c in coloc], 0.4, label="colocated",
             color="#4c72b0")
    left.bar([i + 0.2 for i in x], [d["ttft"] for d in disagg], 0.4, label="1P1D",
             color="#dd8452")
    left.set_xticks(list(x), [f"{n} tokens" for n in lengths])
    left.set_yscale("log")
    left.set_ylabel("TTFT, ms (median, log scale)")
    left.legend()
    parts = {"prefill slowdown": [d["prefill compute"] - c["prefill compute"]
                                  for c, d in zip(coloc, disagg, strict=True)]}
    for stage in ("reserve", "driver", "prefill queue", "KV transfer", "decode admission"):
        parts[stage] = [d[stage] for d in disagg]
    parts["stream"] = [d["stream"] - c["stream"] for c, d in zip(coloc, disagg, strict=True)]
    bottom = [0.0] * len(lengths)
    for stage, values in parts.items():
        right.bar(list(x), values, 0.5, bottom=bottom, label=stage, color=_COLORS[stage])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, d in enumerate(disagg):
        extra = d["ttft"] - coloc[i]["ttft"]
        right.annotate(f"{100 * extra / coloc[i]['ttft']:+.1f}%", (i, max(bottom[i], 0)),
                       ha="center", va="bottom", fontsize=8)
    right.set_xticks(list(x), [f"{n} tokens" for n in lengths])
    right.set_ylabel("1P1D TTFT minus colocated, ms")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle("TTFT at low load: SmolLM2 fp32, one core per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


_COLORS = {"prefill slowdown": "#4c72b0", "reserve": "#bbbbbb", "driver": "#dddddd",
           "prefill queue": "#999999", "KV transfer": "#dd8452", "decode admission": "#c44e52",
           "stream": "#55a868"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transport", choices=["zmq", "torch"], default="zmq")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    max_len = max(args.lengths)
    cores = sorted(os.sched_getaffinity(0))
    p_core, d_core = (cores[0],), (cores[1 % len(cores)],)
    spec = ClusterSpec(model=args.model, block_size=16,
                       num_blocks=-(-(max_len + OUTPUT_TOKENS) // 16) + 16,
                       max_num_batched_tokens=max_len, transport=TransportKind(args.transport),
                       device="cpu")
    print(f"starting workers: prefill on core {p_core[0]}, decode on core {d_core[0]}, "
          f"colocated on core {p_core[0]}", file=sys.stderr)
    procs = [WorkerProcess(spec.worker_config(f"{role.value}-0", role), cpus)
             for role, cpus in ((WorkerRole.PREFILL, p_core), (WorkerRole.DECODE, d_core),
                                (WorkerRole.COLOCATED, p_core))]
    prefill, decode, colocated = (p.worker for p in procs)
    collector = StreamCollector()
    vocab = ModelConfig.from_pretrained(resolve_model(args.model)).vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    runs: dict[str, dict[int, list]] = {"disaggregated": {}, "colocated": {}}
    try:
        total = len(args.lengths) * (args.repeats + 1)
        with tqdm(total=total, desc="ttft", file=sys.stderr) as bar:
            for n in args.lengths:
                for i in range(args.repeats + 1):  # the first of each length warms up
                    prompt = torch.randint(1000, vocab, (n,), generator=gen).tolist()
                    d = run_disaggregated(collector, prefill, decode, f"d{n}-{i}", prompt,
                                          params)
                    prompt = torch.randint(1000, vocab, (n,), generator=gen).tolist()
                    c = run_colocated(collector, colocated, f"c{n}-{i}", prompt, params)
                    if i:
                        runs["disaggregated"].setdefault(n, []).append(d)
                        runs["colocated"].setdefault(n, []).append(c)
                    bar.update()
    finally:
        collector.close()
        for p in procs:
            p.stop()

    result = {"model": args.model, "transport": args.transport, "repeats": args.repeats,
              "lengths": args.lengths, "output_tokens": OUTPUT_TOKENS,
              "disaggregated": {str(n): median_ms(r) for n, r in runs["disaggregated"].items()},
              "colocated": {str(n): median_ms(r) for n, r in runs["colocated"].items()},
              "runs": {k: {str(n): r for n, r in v.items()} for k, v in runs.items()}}
    print(f"\nTTFT, median of {args.repeats}, ms ({args.transport}; one core per worker)")
    print(f"{'prompt':>7} {'colocated':>10} {'1P1D':>8} {'ratio':>6}   1P1D stages: "
          + ", ".join(DISAGG_STAGES))
    for n in args.lengths:
        c, d = result["colocated"][str(n)], result["disaggregated"][str(n)]
        stages = " ".join(f"{d[s]:6.1f}" for s in DISAGG_STAGES)
        print(f"{n:>7} {c['ttft']:>10.1f} {d['ttft']:>8.1f} {d['ttft'] / c['ttft']:>6.3f}   "
              f"{stages}")
        result.setdefault("ratio", {})[str(n)] = d["ttft"] / c["ttft"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
