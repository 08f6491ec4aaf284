"""The simulator against measurement: each measured sweep (`pdserve bench sweep`'s JSON) is
simulated with the same requests (the sweep's prompts and arrivals, seed for seed), the
same SLOs and the same deployments, on a cost profile measured on the same machine; the
table sets simulated beside measured SLO attainment, TTFT and TPOT medians per rate, and
goodput per deployment, with the errors.

    python -m pdserve.bench.sim.validate --profile bench/results/costmodel/profile_cpu.json \\
        --sweeps bench/results/validation/summarize.json bench/results/validation/chat.json \\
        --replays bench/results/validation/overload/overload.json \\
        --json bench/results/validation/sim_vs_measured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pdserve.bench.metrics import Slo, goodput_per_worker
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.sim.workload import sweep_requests
from pdserve.bench.sweep import Workload
from pdserve.protocol.cost_profile import CostProfile
from pdserve.router.config import RouterConfig

# the sweep's deployments (bench.server.DEPLOYMENTS), as pdserve serve starts them
DEPLOYMENTS = {"1p1d": Deployment(1, 1, 0, router=RouterConfig(disaggregation_threshold=1)),
               "2colo": Deployment(0, 0, 2)}


def validate_sweep(data: dict, profile: CostProfile) -> dict:
    w = Workload(**data["workload"])
    slo = Slo(data["slo"]["ttft_ms"], data["slo"]["tpot_ms"])
    n, seeds = data["num_prompts"], data["seeds"]
    rows, goodput = [], {}
    for name, deployment in DEPLOYMENTS.items():
        if name not in data["summary"]:
            continue
        points = []
        for i, rate in enumerate(w.rates):
            measured = [r for r in data["runs"]
                        if r["deployment"] == name and r["request_rate"] == rate]
            if not measured:
                continue
            simulated = []
            for seed in seeds:
                # the run's requests as the sweep sent them (a trace's or the shifting
                # workload's arrivals follow the rate)
                run = simulate(deployment, profile, *sweep_requests(w, n, seed, i, rate),
                               warm=True)  # the sweep warms each deployment up first
                simulated.append(run.summary(slo))
            row = {"workload": w.name, "deployment": name, "rate": rate}
            for key in ("slo_attainment", "median_ttft_ms", "median_tpot_ms"):
                row[f"measured_{key}"] = statistics.mean(r[key] for r in measured)
                row[f"simulated_{key}"] = statistics.mean(r[key] for r in simulated)
            rows.append(row)
            points.append((rate, row["simulated_slo_attainment"]))
        sim_gp, sim_note = goodput_per_worker(points, deployment.workers)
        meas = data["summary"][name]
        goodput[name] = {"measured": meas["goodput_per_worker"],
                         "measured_note": meas["goodput_note"],
                         "simulated": sim_gp, "simulated_note": sim_note}
    ranked = {kind: sorted(goodput, key=lambda d: -goodput[d][kind])
              for kind in ("measured", "simulated")}
    measured = sorted(round(g["measured"], 6) for g in goodput.values())
    tied = len(set(measured)) < len(measured)  # measured equal: no order to reproduce
    return {"workload": w.name, "slo": data["slo"], "rows": rows, "goodput": goodput,
            "same_ranking": None if tied else ranked["measured"] == ranked["simulated"],
            "ranking": ranked}


def validate_replay(data: dict, profile: CostProfile) -> dict:
    """An overload replay (`pdserve bench overload`'s JSON): each run's requests (the
    trace's lengths, its gaps scaled to the run's rate, the SLO sent with each) simulated;
    refusals, admitted attainment and TTFT median beside the measured ones."""
    from pdserve.bench.overload import REPLAYS, Replay, samples

    rows = []
    order = {}
    for run in data["runs"]:
        replay = Replay(**data["replays"][run["trace"]]) if run["trace"] in data["replays"] \
            else REPLAYS[run["trace"]]
        multipliers = order.setdefault((run["trace"], run["deployment"]), [])
        multipliers.append(run["multiplier"])
        window = samples(replay, run["num_prompts"], 1000 * len(multipliers))
        slo = Slo(data["slo"][run["trace"]]["ttft_ms"], data["slo"][run["trace"]]["tpot_ms"])
        sim = simulate(DEPLOYMENTS[run["deployment"]], profile, [len(s.prompt) for s in window],
                       [s.output_len for s in window],
                       [s.arrival * run["time_scale"] for s in window], sent_slo=slo,
                       warm=True).summary(slo)
        row = {"workload": f"{run['trace']} replay", "deployment": run["deployment"],
               "rate": run["request_rate"], "multiplier": run["multiplier"]}
        for key in ("slo_attainment", "slo_admitted_attainment", "refused", "median_ttft_ms",
                    "median_tpot_ms"):
            row[f"measured_{key}"], row[f"simulated_{key}"] = run[key], sim[key]
        rows.append(row)
    return {"workload": "replay", "slo": data["slo"], "rows": rows, "goodput": {},
            "same_ranking": None, "ranking": {}}


def errors(result: dict) -> dict:
    """Relative errors of the medians (over the points) and of goodput; absolute of
    attainment (it is a share)."""
    def rel(m, s):
        if m == s:
            return 0.0
        return abs(s - m) / m if m else float("inf")

    rows = result["rows"]
    return {
        "ttft_p50_rel_err_median": statistics.median(
            rel(r["measured_median_ttft_ms"], r["simulated_median_ttft_ms"]) for r in rows),
        "tpot_p50_rel_err_median": statistics.median(
            rel(r["measured_median_tpot_ms"], r["simulated_median_tpot_ms"]) for r in rows),
        "attainment_abs_err_max": max(abs(r["measured_slo_attainment"]
                                          - r["simulated_slo_attainment"]) for r in rows),
        "goodput_rel_err": {d: rel(g["measured"], g["simulated"])
                            for d, g in result["goodput"].items()},
    }


def print_replay(result: dict) -> None:
    print("\nreplays: measured / simulated")
    print("| replay | deployment | rate (x capacity) | refused | admitted attainment | "
          "TTFT p50 (ms) | TPOT p50 (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['workload']} | {r['deployment']} | {r['rate']:.3f} ({r['multiplier']:g}x)"
              f" | {r['measured_refused']} / {r['simulated_refused']} | "
              f"{r['measured_slo_admitted_attainment']:.2f} / "
              f"{r['simulated_slo_admitted_attainment']:.2f} | "
              f"{r['measured_median_ttft_ms']:.0f} / {r['simulated_median_ttft_ms']:.0f} | "
              f"{r['measured_median_tpot_ms']:.1f} / {r['simulated_median_tpot_ms']:.1f} |")


def print_table(result: dict) -> None:
    print(f"\n{result['workload']} (SLO TTFT {result['slo']['ttft_ms']:.0f} ms, "
          f"TPOT {result['slo']['tpot_ms']:.1f} ms): measured / simulated")
    print("| deployment | rate | attainment | TTFT p50 (ms) | TPOT p50 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['deployment']} | {r['rate']:g} | {r['measured_slo_attainment']:.2f} / "
              f"{r['simulated_slo_attainment']:.2f} | {r['measured_median_ttft_ms']:.0f} / "
              f"{r['simulated_median_ttft_ms']:.0f} | {r['measured_median_tpot_ms']:.1f} / "
              f"{r['simulated_median_tpot_ms']:.1f} |")
    for d, g in result["goodput"].items():
        print(f"goodput per worker, {d}: measured {g['measured']:.3f}{_note(g['measured_note'])}"
              f", simulated {g['simulated']:.3f}{_note(g['simulated_note'])}")
    same = {True: "yes", False: "no", None: "measured goodputs tie"}[result["same_ranking"]]
    print(f"same ranking: {same}; errors: {result['errors']}")


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.sim.validate",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--sweeps", type=Path, nargs="+", required=True)
    ap.add_argument("--replays", type=Path, nargs="*", default=[],
                    help="`pdserve bench overload` results to replay too")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    profile = CostProfile.load(args.profile)
    results = []
    for paths, validate, show in ((args.sweeps, validate_sweep, print_table),
                                  (args.replays, validate_replay, print_replay)):
        for path in paths:
            result = validate(json.loads(path.read_text()), profile)
            result["errors"] = errors(result)
            result["measured_file"] = str(path)
            show(result)
            results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"profile": str(args.profile), "sweeps": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
