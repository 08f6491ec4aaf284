"""Plots of the robustness benchmarks, in the sweep report's style (bench.report):
`plot_overload` (per trace: SLO attainment of admitted requests, refused and failed shares,
p99 refusal latency against the rate multiplier, one line per deployment) and `plot_soak`
(RSS of every process over the soak, and what the streams got per interval)."""

from __future__ import annotations

from pathlib import Path

from pdserve.bench.report import COLORS, LABELS

PANELS = (("slo_admitted_attainment", "SLO attainment of admitted (%)", 100.0, 90.0),
          ("refused", "refused (% of issued)", None, None),
          ("failed", "failed after admission (% of issued)", None, 0.0),
          ("p99_refusal_ms", "p99 refusal latency (ms)", 1.0, 50.0))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overload(result: dict, path: Path) -> None:
    plt = _pyplot()
    traces = list(result["replays"])
    fig, axes = plt.subplots(len(PANELS), len(traces), figsize=(5.5 * len(traces), 11),
                             squeeze=False, sharex=True)
    for col, trace in enumerate(traces):
        runs = [r for r in result["runs"] if r["trace"] == trace]
        for row, (key, label, factor, target) in enumerate(PANELS):
            ax = axes[row][col]
            for dep in sorted({r["deployment"] for r in runs}):
                mine = sorted((r for r in runs if r["deployment"] == dep),
                              key=lambda r: r["multiplier"])
                ys = [r[key] * factor if factor else 100 * r[key] / max(r["num_prompts"], 1)
                      for r in mine]
                ax.plot([r["multiplier"] for r in mine], ys, "o-", color=COLORS[dep],
                        label=f"{LABELS[dep]} (capacity {mine[0]['capacity']:.2f} req/s)"
                        if mine else LABELS[dep])
            if target is not None:
                ax.axhline(target, color="grey", linestyle="--", linewidth=1)
            ax.set_ylabel(label)
            ax.set_xticks(sorted({r["multiplier"] for r in runs}))
            if factor != 1.0:  # the shares in percent, on one scale
                ax.set_ylim(-5, 105)
            if row == 0:
                slo = result["slo"].get(trace, {})
                ax.set_title(f"{trace}: SLO TTFT {slo.get('ttft_ms', 0):.0f} ms, "
                             f"TPOT {slo.get('tpot_ms', 0):.0f} ms", fontsize=10)
                ax.legend(fontsize=8)
            if row == len(PANELS) - 1:
                ax.set_xlabel("request rate / measured capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_soak(result: dict, path: Path) -> None:
    plt = _pyplot()
    samples = result["samples"]
    fig, (mem, got) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    t = [s["t"] for s in samples]
    for name in sorted({n for s in samples for n in s["rss_mb"]}):
        mem.plot(t, [s["rss_mb"].get(name) for s in samples], "o-", markersize=3, label=name)
    load = samples[-1]["t"]
    for x, what in ((0, "start"), (load / 2, "middle"), (load, "end")):
        mem.axvline(x, color="grey", linestyle=":", linewidth=1)
        mem.annotate(what, (x, 1), xycoords=("data", "axes fraction"), fontsize=8,
                     ha="center", va="bottom")
    mem.set_ylabel("resident memory (MB)")
    mem.set_title(f"{result['streams']} streams through one router "
                  f"({result['deployment']}), {result['duration']:.0f} s", fontsize=10)
    mem.legend(fontsize=8)
    for key, color in (("ok", "#55a868"), ("refused", "#dd8452"), ("failed", "#c44e52"),
                       ("hung", "black")):
        steps = [(b[key] - a[key]) / max(b["t"] - a["t"], 1e-9)
                 for a, b in zip(samples, samples[1:], strict=False)]
        got.plot(t[1:], steps, "o-", markersize=3, color=color, label=key)
    got.set_ylabel("requests ended per second")
    got.set_xlabel("seconds since the load began")
    got.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
