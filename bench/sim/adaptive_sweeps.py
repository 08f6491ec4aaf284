"""The adaptive sweeps (`pdserve bench sweep --deployments 1p1d 2colo adaptive --send-slo`,
bench/results/adaptive/) simulated beside their measurement: each run's requests (the
sweep's prompts and arrivals, seed for seed, bench.sim.workload's `sweep_requests`), its
SLO sent with every request as the sweep sent it, and the three deployments as
bench/server.py starts them (1 prefill + 1 decode at threshold 1; 2 colocated; 2 adaptive
workers starting as 1 prefill + 1 decode, each request placed by the router's cost profile,
the controller's dwell 10 s), 1,024 KV blocks a worker, the workers' meters warm as the
sweep's warm-up leaves them. The table sets simulated beside measured attainment per
deployment and rate, and adaptive over the best static deployment in each.

Every deployment is simulated for every file, so each simulated ratio compares runs of the
same SLO; a file that measured adaptive alone (a rerun) takes its measured static rows from
the file of the same workload beside it, as the README's table does (`borrowed`).

    python -m pdserve.bench.sim.adaptive_sweeps \\
        --profile bench/results/costmodel/profile_cpu.json \\
        --json bench/results/adaptive/sim_vs_measured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pdserve.bench.metrics import Slo
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.sim.workload import sweep_requests
from pdserve.bench.sweep import Workload
from pdserve.protocol.cost_profile import CostProfile
from pdserve.router.config import RouterConfig
from pdserve.router.controller.decide import ControllerConfig

RESULTS = Path("bench/results/adaptive")
SWEEPS = [RESULTS / f"{name}.json" for name in ("shifting", "chat", "summarize", "mooncake")] \
    + [RESULTS / "rerun" / f"{name}.json" for name in ("shifting", "chat")]
ROUTER_PROFILE = Path("bench/results/costmodel/profile_cpu.json")  # bench.server's
STATIC = ("1p1d", "2colo")
KEYS = ("slo_attainment", "slo_admitted_attainment", "refused", "median_ttft_ms",
        "median_tpot_ms")


def deployments(router_profile: CostProfile, num_blocks: int = 1024) -> dict[str, Deployment]:
    """bench.server's DEPLOYMENTS as `pdserve serve` starts them (`--num-blocks 1024`)."""
    dwell = 10.0
    return {
        "1p1d": Deployment(1, 1, 0, num_blocks=num_blocks,
                           router=RouterConfig(disaggregation_threshold=1)),
        "2colo": Deployment(0, 0, 2, num_blocks=num_blocks),
        "adaptive": Deployment(0, 0, 0, num_blocks=num_blocks, adaptive=2, router=RouterConfig(
            cost_profile=router_profile,
            controller=ControllerConfig(dwell_s=dwell, cooldown_s=dwell / 3))),
    }


def simulate_file(data: dict, profile: CostProfile, deps: dict[str, Deployment]) -> list[dict]:
    """One row per (rate, deployment): the simulated means over the file's seeds, the
    measured ones where the file has the deployment."""
    w = Workload(**{**data["workload"], "rates": tuple(data["workload"]["rates"])})
    slo = Slo(data["slo"]["ttft_ms"], data["slo"]["tpot_ms"])
    sent = slo if "--send-slo" in data.get("command", "") else None
    n, seeds = data["num_prompts"], data["seeds"]
    rows = []
    for i, rate in enumerate(w.rates):
        for name, dep in deps.items():
            sims, switches = [], 0
            for seed in seeds:
                run = simulate(dep, profile, *sweep_requests(w, n, seed, i, rate),
                               sent_slo=sent, warm=True)  # the sweep warms each one up first
                sims.append(run.summary(slo))
                switches += len(run.switches)
            row = {"workload": w.name, "rate": rate, "deployment": name,
                   "simulated_switches": switches / len(seeds)}
            row.update({f"simulated_{k}": statistics.mean(s[k] for s in sims) for k in KEYS})
            measured = [r for r in data["runs"]
                        if r["deployment"] == name and r["request_rate"] == rate]
            if measured:
                row.update({f"measured_{k}": statistics.mean(r[k] for r in measured)
                            for k in KEYS})
            rows.append(row)
    return rows


def borrow(rows: list[dict], sibling: list[dict]) -> None:
    """Measured static rows missing from `rows` taken from the sibling file's."""
    for row in rows:
        if "measured_slo_attainment" in row or row["deployment"] not in STATIC:
            continue
        for other in sibling:
            if (other["deployment"], other["rate"]) == (row["deployment"], row["rate"]) \
                    and "measured_slo_attainment" in other:
                row.update({k: v for k, v in other.items() if k.startswith("measured_")})
                row["borrowed"] = True


def ratios(rows: list[dict]) -> list[dict]:
    """Per rate: adaptive's attainment over the best static deployment's, measured and
    simulated, and which static deployment is the best."""
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        at = {r["deployment"]: r for r in rows if r["rate"] == rate}
        point = {"rate": rate}
        for kind in ("measured", "simulated"):
            key = f"{kind}_slo_attainment"
            static = {d: at[d][key] for d in STATIC if d in at and key in at[d]}
            if "adaptive" not in at or key not in at["adaptive"] or not static:
                continue
            best = max(static, key=static.get)
            point[f"{kind}_best_static"] = best
            point[f"{kind}_ratio"] = (at["adaptive"][key] / static[best] if static[best]
                                      else None)
        out.append(point)
    return out


def run_all(paths: list[Path], profile: CostProfile, router_profile: CostProfile) -> list[dict]:
    deps = deployments(router_profile)
    files = {}
    for path in paths:
        data = json.loads(path.read_text())
        files[path] = (data, simulate_file(data, profile, deps))
    out = []
    for path, (data, rows) in files.items():
        siblings = [r for p, (d, r) in files.items()
                    if p != path and d["workload"]["name"] == data["workload"]["name"]]
        for sibling in siblings:
            borrow(rows, sibling)
        out.append({"file": str(path), "workload": data["workload"]["name"],
                    "slo": data["slo"], "num_prompts": data["num_prompts"],
                    "seeds": data["seeds"], "rows": rows, "ratios": ratios(rows)})
    return out


def _pair(row: dict, key: str, fmt: str) -> str:
    m = row.get(f"measured_{key}")
    measured = "-" if m is None else format(m, fmt) + ("*" if row.get("borrowed") else "")
    return f"{measured} / {format(row[f'simulated_{key}'], fmt)}"


def table(results: list[dict]) -> str:
    """The markdown table: per file and rate, attainment measured / simulated for each
    deployment, then adaptive / best static, measured and simulated."""
    lines = ["| run | rate | 1p1d | 2colo | adaptive (sim. switches) | adaptive / best static, "
             "measured | simulated |", "|---|---:|---|---|---|---|---|"]
    for f in results:
        name = f["workload"] + (" (rerun)" if "/rerun/" in f["file"] else "")
        for point in f["ratios"]:
            at = {r["deployment"]: r for r in f["rows"] if r["rate"] == point["rate"]}
            cells = [_pair(at[d], "slo_attainment", ".2f") for d in ("1p1d", "2colo")]
            a = at["adaptive"]
            cells.append(f"{_pair(a, 'slo_attainment', '.2f')} "
                         f"({a['simulated_switches']:g})")
            for kind in ("measured", "simulated"):
                ratio = point.get(f"{kind}_ratio")
                cells.append("-" if ratio is None
                             else f"{ratio:.2f}x {point[f'{kind}_best_static']}")
            lines.append(f"| {name} | {point['rate']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.sim.adaptive_sweeps",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True,
                    help="what the simulated steps cost")
    ap.add_argument("--router-profile", type=Path, default=ROUTER_PROFILE,
                    help="what the adaptive router predicts with (%(default)s, bench.server's)")
    ap.add_argument("--sweeps", type=Path, nargs="+", default=SWEEPS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    profile = CostProfile.load(args.profile)
    router_profile = (profile if args.router_profile == args.profile
                      else CostProfile.load(args.router_profile))
    results = run_all(args.sweeps, profile, router_profile)
    print("SLO attainment, measured / simulated (* measured in the first run of the "
          "workload)")
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"profile": str(args.profile),
                                         "router_profile": str(args.router_profile),
                                         "files": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
