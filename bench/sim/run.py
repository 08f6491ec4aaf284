"""`pdserve simulate`: a workload through a simulated deployment, on a cost profile, with the
result `pdserve bench` writes (vLLM's keys, `slo_*`, `disagg_*`) for each rate and seed,
and the goodput over the rates (DistServe's: the highest rate at 90% attainment, per
worker). The workload flags are `pdserve bench`'s; the deployment flags `pdserve serve`'s.

    pdserve simulate --profile bench/results/costmodel/profile_cpu.json \\
        --prefill 1 --decode 1 --disaggregation-threshold 1 \\
        --dataset random --input-len 768 --output-len 48 --range-ratio 0.25 \\
        --request-rate 0.15 0.3 0.45 0.6 --seeds 0 1 2 --slo-ttft-ms 5090 --slo-tpot-ms 51

The sweep's adaptive deployment (bench.server: two workers whose roles the controller sets,
each request placed by the router's cost profile) on its shifting workload:

    pdserve simulate --profile bench/results/costmodel/profile_cpu.json \\
        --prefill 0 --decode 0 --adaptive 2 --adaptive-dwell 10 --cost-profile \\
        --num-blocks 1024 --sweep-workload shifting --num-prompts 48 --request-rate 0.5 \\
        --slo-ttft-ms 7597 --slo-tpot-ms 93.9 --send-slo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pdserve.bench.metrics import Slo, goodput_per_worker
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.sim.workload import EXACT_UP_TO, requests, sweep_requests
from pdserve.bench.sweep_workloads import WORKLOADS
from pdserve.bench.workload import DEFAULT_TRACES_DIR, TRACES
from pdserve.protocol.cost_profile import CostProfile
from pdserve.router.config import RouterConfig
from pdserve.router.controller.decide import ControllerConfig

OWN_PROFILE = "-"  # --cost-profile without a path: the router predicts with --profile


def add_deployment_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("deployment (pdserve serve's flags)")
    g.add_argument("--prefill", type=int, default=1)
    g.add_argument("--decode", type=int, default=1)
    g.add_argument("--colocated", type=int, default=0)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="a step's token budget: the prefill chunk (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="the batch cap")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per worker (default: the profile's KV capacity)")
    g.add_argument("--disaggregation-threshold", type=int, default=128)
    g.add_argument("--max-in-flight-per-worker", type=int, default=32)
    g.add_argument("--max-queue", type=int, default=256)
    g.add_argument("--default-ttft-slo", type=float, default=30.0,
                   help="admission's TTFT bound, seconds (0: none)")
    g.add_argument("--adaptive", type=int, default=0, metavar="N",
                   help="workers whose role the controller sets (one starts colocated, more "
                        "half prefill, half decode), after the pools above")
    g.add_argument("--adaptive-dwell", type=float, default=30.0, metavar="SECONDS",
                   help="an adaptive worker keeps a role at least this long; the controller "
                        "moves at most one per third of this (%(default)s)")
    g.add_argument("--cost-profile", nargs="?", const=OWN_PROFILE, default=None,
                   metavar="PATH", help="the router places and admits each request by the "
                   "TTFT and TPOT this profile predicts (without PATH: --profile's)")


def deployment_from(args, profile: CostProfile | None = None) -> Deployment:
    """`profile`: the simulation's, which `--cost-profile` without a path names."""
    cost = None
    if getattr(args, "cost_profile", None) is not None:
        cost = profile if args.cost_profile == OWN_PROFILE else CostProfile.load(
            Path(args.cost_profile))
    adaptive = getattr(args, "adaptive", 0)
    controller = (ControllerConfig(dwell_s=args.adaptive_dwell,
                                   cooldown_s=args.adaptive_dwell / 3)
                  if adaptive > 0 else None)  # as `pdserve serve --adaptive` sets it
    router = RouterConfig(disaggregation_threshold=args.disaggregation_threshold,
                          max_in_flight_per_worker=args.max_in_flight_per_worker,
                          max_queue=args.max_queue, default_ttft_slo_s=args.default_ttft_slo,
                          cost_profile=cost, controller=controller)
    return Deployment(args.prefill, args.decode, args.colocated, args.max_num_batched_tokens,
                      args.max_num_seqs, args.block_size, args.num_blocks, router=router,
                      adaptive=adaptive)


def add_workload_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("workload (pdserve bench's flags)")
    g.add_argument("--dataset", choices=["random", *TRACES], default="random")
    g.add_argument("--traces-dir", type=Path, default=DEFAULT_TRACES_DIR)
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--input-len", type=int, default=512)
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--range-ratio", type=float, default=0.0)
    g.add_argument("--prefix-len", type=int, default=0)
    g.add_argument("--length-scale", type=float, default=1.0)
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="traces: gap factor (2 replays at half the rate)")
    g.add_argument("--max-input-len", type=int, default=None)
    g.add_argument("--max-output-len", type=int, default=512)
    g.add_argument("--vocab-size", type=int, default=49152)
    g.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="req/s, one or more (a sweep); traces keep their own times")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="runs per rate: fresh prompts and arrivals each")
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--send-slo", action="store_true",
                   help="the SLO goes with every request (the router's admission uses it)")


def run_point(deployment: Deployment, profile: CostProfile, args, rate: float, seed: int,
              slo: Slo | None, keep_itl: bool = True) -> dict:
    """One (rate, seed) run: its summary, as `pdserve bench` writes it."""
    if getattr(args, "sweep_workload", None):
        prompts, outputs, arrivals = sweep_requests(
            args.sweep_workload, args.num_prompts, seed, args.request_rate.index(rate), rate)
    else:
        reqs = requests(args, seed)
        prompts, outputs = reqs.prompt_lens, reqs.output_lens
        arrivals = reqs.arrivals(rate, args.burstiness, seed)
    t0 = time.perf_counter()
    run = simulate(deployment, profile, prompts, outputs, arrivals,
                   sent_slo=slo if args.send_slo else None, keep_itl=keep_itl)
    result = run.summary(slo, profile.kv_bytes_per_token)
    if not keep_itl:  # a run too large for per-request lists in its JSON
        for key in ("ttfts", "tpots", "output_lens", "input_lens", "errors"):
            result.pop(key)
        result["per_request_lists"] = f"left out past {EXACT_UP_TO:,} requests"
    result.update({"backend": "simulated", "deployment": deployment.name,
                   "num_workers": deployment.workers, "request_rate": rate, "seed": seed,
                   "dataset": args.dataset, "burstiness": args.burstiness,
                   "sim_events": run.events, "sim_preemptions": run.preemptions,
                   "sim_wall_s": time.perf_counter() - t0, "sim_busy": run.busy,
                   "sim_switches": [vars(m) | {"from_role": m.from_role.value,
                                               "to_role": m.to_role.value}
                                    for m in run.switches],
                   "sim_roles": run.roles})
    if getattr(args, "sweep_workload", None):
        result["dataset"] = f"sweep:{args.sweep_workload}"
    return result


def simulate_sweep(deployment: Deployment, profile: CostProfile, args, slo: Slo | None,
                   progress: bool = True) -> dict:
    runs = []
    plan = [(rate, seed) for rate in args.request_rate for seed in args.seeds]
    for rate, seed in tqdm(plan, desc=f"simulating {deployment.name}", file=sys.stderr,
                           disable=not progress or len(plan) < 2):
        runs.append(run_point(deployment, profile, args, rate, seed, slo,
                              keep_itl=args.num_prompts <= EXACT_UP_TO))
    out = {"deployment": deployment.name, "num_workers": deployment.workers,
           "profile": {"source": profile.source, "machine": profile.machine,
                       "model": profile.model}, "runs": runs}
    if slo is not None:
        points = [(rate, _mean(r["slo_attainment"] for r in runs if r["request_rate"] == rate))
                  for rate in args.request_rate]
        per_worker, note = goodput_per_worker(points, deployment.workers)
        out["summary"] = {"attainment": points, "goodput_per_worker": per_worker,
                          "goodput": per_worker * deployment.workers, "goodput_note": note}
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True,
                    help="a cost profile (pdserve profile writes one)")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    add_deployment_flags(ap)
    add_workload_flags(ap)
    ap.add_argument("--sweep-workload", choices=sorted(WORKLOADS), default=None,
                    help="send a `pdserve bench sweep` workload's requests instead (its "
                         "prompts and arrivals, the i-th rate's as the sweep draws them)")
    args = ap.parse_args(argv)
    profile = CostProfile.load(args.profile)
    slo = (Slo(args.slo_ttft_ms, args.slo_tpot_ms)
           if args.slo_ttft_ms is not None and args.slo_tpot_ms is not None else None)
    result = simulate_sweep(deployment_from(args, profile), profile, args, slo)
    for run in result["runs"]:
        line = (f"{result['deployment']} @ {run['request_rate']:g} req/s seed {run['seed']}: "
                f"TTFT p50 {run['median_ttft_ms']:.0f} ms, TPOT p50 {run['median_tpot_ms']:.1f}"
                f" ms, completed {run['completed']}/{run['num_prompts']}")
        if slo is not None:
            line += f", SLO attainment {run['slo_attainment']:.1%}"
        if run["sim_switches"]:
            line += ", role switches: " + ", ".join(
                f"{m['worker_id']} {m['from_role']} -> {m['to_role']} at {m['time']:.0f} s"
                for m in run["sim_switches"])
        print(line)
    if "summary" in result:
        s = result["summary"]
        print(f"goodput {s['goodput']:.3f} req/s ({s['goodput_per_worker']:.3f} per worker)"
              + (f" [{s['goodput_note']}]" if s["goodput_note"] else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
