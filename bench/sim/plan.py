"""`pdserve plan`: which deployment serves a workload with the most goodput per worker under
its SLOs, found by simulation on a cost profile.

For every candidate (a split of `--workers` into prefill, decode and colocated workers,
times the chunk budgets, batch caps and disaggregation thresholds given), goodput is the
highest request rate whose SLO attainment stays at or above `--attainment` (DistServe's
definition, as `pdserve bench sweep` measures it): found by bisection on the rate, each
probe a simulated run of `--num-prompts` requests (the same lengths at every rate; a
trace's gaps are scaled to the rate, the trace replayed as often as it takes). The best
few are printed with their attainment at fractions of their goodput, and `--plot` draws
goodput per worker against the prefill:decode ratio.

    pdserve plan --profile bench/results/costmodel/profile_cpu.json --workers 2 \\
        --dataset random --input-len 768 --output-len 48 --range-ratio 0.25 \\
        --slo-ttft-ms 5090 --slo-tpot-ms 51
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pdserve.bench.metrics import Slo
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.sim.run import add_workload_flags
from pdserve.bench.sim.workload import Requests, requests
from pdserve.protocol.cost_profile import CostProfile
from pdserve.router.config import RouterConfig


@dataclass(frozen=True)
class Candidate:
    deployment: Deployment
    goodput: float = 0.0  # req/s at the attainment target
    curve: tuple[tuple[float, float], ...] = ()  # (rate, attainment) probed

    @property
    def per_worker(self) -> float:
        return self.goodput / self.deployment.workers


def candidates(workers: int, chunks: list[int], caps: list[int], thresholds: list[int],
               colocated: bool = True, ratios: list[tuple[int, int]] | None = None
               ) -> list[Deployment]:
    """Every split of `workers` into P prefill + D decode (P, D >= 1), or those nearest the
    P:D `ratios`, and all colocated, times the settings."""
    if ratios:
        prefills = {min(workers - 1, max(1, round(workers * p / (p + d)))) for p, d in ratios}
    else:
        prefills = set(range(1, workers))
    splits = [(p, workers - p, 0) for p in sorted(prefills) if workers > 1]
    if colocated:
        splits.append((0, 0, workers))
    out = []
    for p, d, c in splits:
        for chunk in chunks:
            for cap in caps:
                for threshold in (thresholds if p else [thresholds[0]]):
                    out.append(Deployment(p, d, c, max_num_batched_tokens=chunk,
                                          max_num_seqs=cap, router=RouterConfig(
                                              disaggregation_threshold=threshold,
                                              max_in_flight_per_worker=max(cap, 32))))
    return out


class Prober:
    """Attainment of a deployment at a rate, by simulation (cached)."""

    def __init__(self, profile: CostProfile, args, slo: Slo):
        self.profile, self.args, self.slo = profile, args, slo
        self._cache: dict[tuple, float] = {}
        self._requests: dict[int, Requests] = {}

    def requests(self, seed: int) -> Requests:
        """The same requests at every rate (a random dataset's lengths, a trace's), so the
        search compares rates, not draws."""
        if seed not in self._requests:  # lengths are all a search needs
            self._requests[seed] = requests(self.args, seed, exact=False)
        return self._requests[seed]

    def attainment(self, deployment: Deployment, rate: float) -> float:
        key = (deployment, round(rate, 9))
        if key not in self._cache:
            values = []
            for seed in self.args.seeds:
                reqs = self.requests(seed)
                run = simulate(deployment, self.profile, reqs.prompt_lens, reqs.output_lens,
                               reqs.arrivals(rate, self.args.burstiness, seed, rate_scaled=True),
                               keep_itl=False,
                               sent_slo=self.slo if self.args.send_slo else None)
                values.append(run.summary(self.slo)["slo_attainment"])
            self._cache[key] = sum(values) / len(values)
        return self._cache[key]

    def goodput(self, deployment: Deployment, target: float, hi: float,
                steps: int) -> Candidate:
        """Bisection on the rate between 0 and `hi` (doubled until attainment falls
        below `target`)."""
        curve = []
        while (a := self.attainment(deployment, hi)) >= target and hi < 1e6:
            curve.append((hi, a))
            hi *= 2
        curve.append((hi, a))
        lo = 0.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            a = self.attainment(deployment, mid)
            curve.append((mid, a))
            if a >= target:
                lo = mid
            else:
                hi = mid
        return Candidate(deployment, lo, tuple(sorted(curve)))


def plan(prober: Prober, args, progress: bool = True) -> list[Candidate]:
    """Every candidate with its goodput, best per worker first."""
    deployments = candidates(args.workers, args.chunk_sizes, args.batch_caps,
                             args.disaggregation_thresholds, not args.no_colocated,
                             args.pd_ratios)
    start = args.start_rate or args.workers * 0.5
    found = []
    for d in tqdm(deployments, desc="planning", file=sys.stderr, disable=not progress):
        found.append(prober.goodput(d, args.attainment, start, args.bisections))
    return sorted(found, key=lambda c: -c.per_worker)


def describe(c: Candidate) -> str:
    d = c.deployment
    return (f"{d.name:>10}  chunk {d.max_num_batched_tokens:>5}  batch cap {d.max_num_seqs:>4}"
            f"  threshold {d.router.disaggregation_threshold:>5}  goodput {c.goodput:8.3f}"
            f" req/s  ({c.per_worker:.3f} per worker)")


def plot(found: list[Candidate], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[str, Candidate] = {}
    for c in found:  # the best settings of each split
        name = c.deployment.name
        if name not in best or c.per_worker > best[name].per_worker:
            best[name] = c
    disagg = sorted((c for c in best.values() if c.deployment.prefill),
                    key=lambda c: c.deployment.prefill / c.deployment.decode)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c.deployment.prefill / c.deployment.decode for c in disagg],
            [c.per_worker for c in disagg], "o-", label="disaggregated (P:D)")
    for c in disagg:
        ax.annotate(c.deployment.name, (c.deployment.prefill / c.deployment.decode,
                                        c.per_worker), fontsize=7)
    for c in best.values():
        if not c.deployment.prefill:
            ax.axhline(c.per_worker, color="gray", ls="--",
                       label=f"colocated ({c.deployment.name})")
    ax.set_xscale("log")
    ax.set_xlabel("prefill : decode workers")
    ax.set_ylabel("goodput per worker (req/s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _ratio(text: str) -> tuple[int, int]:
    p, _, d = text.partition(":")
    if not (p.isdigit() and d.isdigit() and int(p) > 0 and int(d) > 0):
        raise argparse.ArgumentTypeError(f"a P:D ratio like 1:3, not {text!r}")
    return int(p), int(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True, help="a cost profile")
    ap.add_argument("--workers", type=int, required=True, help="workers (GPUs) to place")
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048],
                    help="max_num_batched_tokens values to try")
    ap.add_argument("--batch-caps", type=int, nargs="+", default=[64],
                    help="max_num_seqs values to try")
    ap.add_argument("--disaggregation-thresholds", type=int, nargs="+", default=[1, 128],
                    help="prompt tokens under which a prompt is prefilled where it decodes")
    ap.add_argument("--no-colocated", action="store_true", help="disaggregated splits only")
    ap.add_argument("--pd-ratios", type=_ratio, nargs="+", default=None,
                    help="P:D ratios to try, e.g. 1:7 1:3 1:1 (default: every split)")
    ap.add_argument("--attainment", type=float, default=0.9, help="the goodput target")
    ap.add_argument("--start-rate", type=float, default=None,
                    help="first rate probed (default: 0.5 per worker)")
    ap.add_argument("--bisections", type=int, default=7)
    ap.add_argument("--top", type=int, default=5, help="how many to print")
    ap.add_argument("--plot", type=Path, default=None, help="goodput per worker against P:D")
    ap.add_argument("--json", type=Path, default=None)
    add_workload_flags(ap)
    args = ap.parse_args(argv)
    if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
        ap.error("--slo-ttft-ms and --slo-tpot-ms are needed: goodput is under SLOs")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    profile = CostProfile.load(args.profile)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    prober = Prober(profile, args, slo)
    found = plan(prober, args)
    print(f"best of {len(found)} deployments of {args.workers} workers "
          f"(SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms, {args.attainment:.0%}):")
    for c in found[:args.top]:
        print(describe(c))
        for frac in (0.5, 0.8, 1.0, 1.2):
            rate = c.goodput * frac
            if rate > 0:
                print(f"{'':12}at {rate:8.3f} req/s: attainment "
                      f"{prober.attainment(c.deployment, rate):.1%}")
    if args.plot:
        plot(found, args.plot, f"{args.dataset}, {args.workers} workers, profile "
                               f"{profile.source} ({profile.model.get('name', '')})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{
            "deployment": c.deployment.name, "prefill": c.deployment.prefill,
            "decode": c.deployment.decode, "colocated": c.deployment.colocated,
            "max_num_batched_tokens": c.deployment.max_num_batched_tokens,
            "max_num_seqs": c.deployment.max_num_seqs,
            "disaggregation_threshold": c.deployment.router.disaggregation_threshold,
            "goodput": c.goodput, "goodput_per_worker": c.per_worker,
            "curve": c.curve} for c in found], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
