"""Disaggregation at scale, by simulation only: for public traces on clusters of many GPUs
(a GPU's roofline profile), the goodput per GPU of each prefill:decode ratio and of the
same GPUs colocated, found by `pdserve plan`'s search; one plot per trace, goodput per GPU
against the P:D ratio with a line per cluster size.

    python -m pdserve.bench.sim.scale_study \\
        --profile bench/results/costmodel/profile_H100-SXM_llama-3.1-8b_tp1.json \\
        --out bench/results/sim/scale
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pdserve.bench.metrics import Slo
from pdserve.bench.sim.plan import Prober, plan
from pdserve.bench.workload import DEFAULT_TRACES_DIR
from pdserve.protocol.cost_profile import CostProfile

# per trace: the SLOs (DistServe's chatbot / summarization scale for an 8B model), the
# lengths as the trace gives them, and requests per GPU in a probe (enough for tens of
# seconds of traffic near capacity, so a probe sees the steady state, not the first wave)
STUDIES = {
    "azure-conv": {"slo": Slo(2000.0, 100.0), "max_input_len": 8192, "max_output_len": 1024,
                   "requests_per_gpu": 250},
    "mooncake": {"slo": Slo(5000.0, 100.0), "max_input_len": 32768, "max_output_len": 1024,
                 "requests_per_gpu": 100},
}
RATIOS = [(1, 3), (1, 2), (1, 1), (2, 1), (3, 1)]


def study(profile: CostProfile, trace: str, workers: int, per_gpu: int | None,
          bisections: int, progress: bool, ratios=RATIOS) -> dict:
    cfg = STUDIES[trace]
    per_gpu = per_gpu or cfg["requests_per_gpu"]
    args = argparse.Namespace(
        dataset=trace, traces_dir=DEFAULT_TRACES_DIR, num_prompts=per_gpu * workers,
        input_len=0, output_len=0, range_ratio=0.0, prefix_len=0, length_scale=1.0,
        time_scale=1.0, max_input_len=cfg["max_input_len"],
        max_output_len=cfg["max_output_len"], vocab_size=49152, request_rate=[math.inf],
        burstiness=1.0, seeds=[0], slo_ttft_ms=cfg["slo"].ttft_ms,
        slo_tpot_ms=cfg["slo"].tpot_ms, send_slo=False, workers=workers,
        chunk_sizes=[8192], batch_caps=[256], disaggregation_thresholds=[1],
        no_colocated=False, pd_ratios=list(ratios), attainment=0.9, start_rate=workers * 1.0,
        bisections=bisections)
    t0 = time.perf_counter()
    found = plan(Prober(profile, args, cfg["slo"]), args, progress=progress)
    return {"trace": trace, "workers": workers, "requests_per_probe": args.num_prompts,
            "slo": {"ttft_ms": cfg["slo"].ttft_ms, "tpot_ms": cfg["slo"].tpot_ms},
            "wall_s": time.perf_counter() - t0,
            "deployments": [{"deployment": c.deployment.name, "prefill": c.deployment.prefill,
                             "decode": c.deployment.decode,
                             "colocated": c.deployment.colocated, "goodput": c.goodput,
                             "goodput_per_gpu": c.per_worker} for c in found]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"] for r in results})
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        for r in sorted((r for r in results if r["trace"] == trace), key=lambda r: r["workers"]):
            disagg = sorted((d for d in r["deployments"] if d["prefill"]),
                            key=lambda d: d["prefill"] / d["decode"])
            line, = ax.plot([d["prefill"] / d["decode"] for d in disagg],
                            [d["goodput_per_gpu"] for d in disagg], "o-",
                            label=f"{r['workers']} GPUs")
            colo = [d for d in r["deployments"] if d["colocated"]]
            if colo:
                ax.axhline(colo[0]["goodput_per_gpu"], color=line.get_color(), ls="--",
                           lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("prefill : decode GPUs (dashed: all colocated)")
        ax.set_ylabel("goodput per GPU (req/s)")
        ax.set_title(f"{trace}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.sim.scale_study",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--traces", nargs="+", choices=sorted(STUDIES), default=sorted(STUDIES))
    ap.add_argument("--gpus", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--requests-per-gpu", type=int, default=None,
                    help="requests per GPU in each probe (default: the trace's, STUDIES)")
    ap.add_argument("--bisections", type=int, default=4)
    ap.add_argument("--ratios", nargs="+", default=None, metavar="P:D",
                    help="the prefill:decode ratios to search (default: "
                         f"{' '.join(f'{p}:{d}' for p, d in RATIOS)}; colocated always)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sim/scale"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other (trace, GPUs) points of --out/scale.json and replace "
                         "these")
    args = ap.parse_args(argv)
    profile = CostProfile.load(args.profile)
    results = []
    old = args.out / "scale.json"
    if args.merge and old.exists():
        results = [r for r in json.loads(old.read_text())["results"]
                   if (r["trace"], r["workers"]) not in
                   {(t, g) for t in args.traces for g in args.gpus}]
    for trace in args.traces:
        for gpus in args.gpus:
            ratios = ([tuple(int(x) for x in r.split(":")) for r in args.ratios]
                      if args.ratios else RATIOS)
            r = study(profile, trace, gpus, args.requests_per_gpu, args.bisections, True,
                      ratios)
            best = r["deployments"][0]
            print(f"{trace} on {gpus} GPUs: best {best['deployment']} "
                  f"{best['goodput_per_gpu']:.3f} req/s per GPU ({r['wall_s']:.0f} s)")
            results.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    results.sort(key=lambda r: (r["trace"], r["workers"]))
    (args.out / "scale.json").write_text(json.dumps({"profile": str(args.profile),
                                                     "results": results}, indent=1))
    plot(results, args.out / "scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
