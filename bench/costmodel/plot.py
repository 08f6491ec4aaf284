"""The plot of a measured profile: measured against fitted step times, the relative error of
each point, and the KV transfer fit. Reads only the profile (its `step_points` and
`transfer_points` sources), so a saved profile can be plotted again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdserve.protocol.cost_profile import CostProfile

COLORS = {"prefill": "#4c72b0", "decode": "#dd8452", "mixed": "#55a868"}


def plot_profile(profile: CostProfile, path: Path | str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    points = profile.sources.get("step_points") or []
    if not points:
        raise ValueError("the profile holds no measured step points to plot")
    step = profile.step
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, color in COLORS.items():
        rows = [p for p in points if p[0] == kind]
        if not rows:
            continue
        measured = [1e3 * p[4] for p in rows]
        fitted = [1e3 * step.step_s(p[1], p[2], p[3], p[5] if len(p) > 5 else 0) for p in rows]
        left.scatter(measured, fitted, s=18, color=color, label=kind)
        middle.scatter([p[1] for p in rows], [100 * (f / m - 1) for f, m in
                                              zip(fitted, measured, strict=True)],
                       s=18, color=color, label=kind)
    lo = min(1e3 * p[4] for p in points) / 1.5
    hi = max(1e3 * p[4] for p in points) * 1.5
    left.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
    for f in (0.8, 1.2):
        left.plot([lo, hi], [lo * f, hi * f], color="grey", linewidth=0.6, linestyle="--")
    left.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="fitted step (ms)",
             title="engine step: fitted vs measured (dashed: ±20%)")
    for axis in (left.xaxis, left.yaxis):
        axis.set_minor_formatter(NullFormatter())  # minor labels overlap on a log axis
    left.legend(fontsize=8)
    middle.axhline(0, color="grey", linewidth=1)
    middle.set(xscale="log", xlabel="tokens in the step", ylabel="fitted / measured - 1 (%)",
               title="relative error per point")
    fit = profile.sources.get("step_fit", {})
    middle.text(0.02, 0.95, f"median {100 * fit.get('median_rel_err', 0):.1f}%, "
                            f"p90 {100 * fit.get('p90_rel_err', 0):.1f}%",
                transform=middle.transAxes, fontsize=8, va="top")
    transfers = profile.sources.get("transfer_points") or []
    if transfers:
        sizes = np.geomspace(min(b for b, _ in transfers), max(b for b, _ in transfers), 50)
        right.scatter([b / 2**20 for b, _ in transfers], [1e3 * s for _, s in transfers],
                      s=14, color="#8172b2", label="measured")
        fitted = [1e3 * profile.transfer.seconds(int(b)) for b in sizes]
        right.plot([b / 2**20 for b in sizes], fitted,
                   color="black", linewidth=1,
                   label=f"{1e3 * profile.transfer.latency_s:.2f} ms + bytes / "
                         f"{profile.transfer.bytes_per_s / 1e9:.2f} GB/s")
        right.set(xscale="log", yscale="log", xlabel="KV bytes (MiB)", ylabel="transfer (ms)",
                  title="KV transfer (zmq tcp, loopback)")
        right.legend(fontsize=8)
    m = profile.machine
    fig.suptitle(f"{profile.model.get('name')} {profile.model.get('dtype', '')} on {m.get('cpu')}"
                 f", torch threads {m.get('torch_threads')}: step = {1e3 * step.base_s:.1f} ms "
                 f"+ max({1e3 * step.floor_s:.1f} ms, {1e3 * step.token_s:.2f} ms x tokens) "
                 f"+ {1e6 * step.pair_s:.3f} us x pairs + {1e6 * step.context_s:.2f} us x context",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
