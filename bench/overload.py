"""Overload at the door: bursty public traces replayed at 0.5x, 1x and 2x each deployment's
measured capacity; what was refused at admission, what failed after it, and whether the
requests let in met their SLO.

For each trace (lengths scaled to this machine, `REPLAYS`) and deployment (1P1D, 2
colocated, or 2 adaptive workers placed by the cost profile, each started through
`pdserve serve --no-ray --pin-cores`):
0. warm-up requests (none of them measured) so every worker has measured its prefill rate,
   which admission needs; then, on the first deployment of a trace, the SLO calibration:
   median unloaded TTFT and TPOT of trace requests of typical lengths sent one at a time,
   times `--ttft-scale` / `--tpot-scale` (the sweep's method, bench.sweep);
1. capacity: the trace's requests sent closed-loop, `--capacity-concurrency` at a time, no
   arrival times; capacity = successful completions per second in the steady window
   (from the C-th to the (N-C)-th completion: no first wave, no drain);
2. per multiplier m: `--num-prompts` trace requests (fresh prompt tokens, the trace's
   lengths, shared prefixes and arrival pattern) with the gaps rescaled so the mean rate is
   m x capacity; every request carries the SLO (GenerateRequest.slo), so admission judges it
   by that; then the cluster must go idle with every KV block free (bench.cluster).
The targets: 0 failed after admission, >= 90% SLO attainment of admitted
requests at 2x, refusals answered in < 50 ms (p99).

    python -m pdserve.bench.overload --out bench/results/overload
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.bench.backends import Backend
from pdserve.bench.cluster import wait_idle
from pdserve.bench.metrics import RequestResult, Slo, summarize
from pdserve.bench.serve_bench import run_load
from pdserve.bench.server import DEPLOYMENTS, Server
from pdserve.bench.sweep import unloaded_latency
from pdserve.bench.workload import DEFAULT_TRACES_DIR, Sample, trace_dataset, warmup_samples

WARMUP = 2
TARGET_REFUSAL_MS = 50.0
TARGET_ADMITTED_ATTAINMENT = 0.9


@dataclass(frozen=True)
class Replay:
    """How a trace is scaled to this machine (bench.workload.trace_dataset)."""

    trace: str
    length_scale: float
    max_input: int
    max_output: int
    about: str


REPLAYS = {
    "mooncake": Replay("mooncake", 0.05, 2048, 64,
                       "Mooncake: shared 26-token prefix blocks, prompts 1-2,048 tokens "
                       "(median ~580), outputs 1-45 tokens"),
    "azure-conv": Replay("azure-conv", 0.5, 2048, 128,
                         "Azure 2023 conversation: prompts 1-2,048 tokens (median ~510), "
                         "outputs 4-128 tokens (median ~64)"),
}


def samples(r: Replay, n: int, seed: int, time_scale: float = 1.0) -> list[Sample]:
    """The trace's first `n` requests; `seed` draws the prompt tokens (a fresh seed per run,
    so no run finds another's prompts in a prefix cache)."""
    return trace_dataset(r.trace, DEFAULT_TRACES_DIR, n, r.length_scale, time_scale,
                         r.max_input, r.max_output, seed=seed)


def natural_rate(window: list[Sample]) -> float:
    """Mean request rate of a trace window at time scale 1: (n - 1) / span."""
    span = window[-1].arrival - window[0].arrival
    if len(window) < 2 or span <= 0:
        raise ValueError("a trace window of at least two requests over a positive span")
    return (len(window) - 1) / span


def time_scale_for(window: list[Sample], rate: float) -> float:
    """The gap factor that replays `window` at a mean of `rate` req/s."""
    return natural_rate(window) / rate


def typical(window: list[Sample], n: int) -> list[Sample]:
    """`n` requests at evenly spaced length quantiles (calibration of typical lengths)."""
    ranked = sorted(window, key=lambda s: len(s.prompt))
    picked = [ranked[int((i + 0.5) * len(ranked) / n)] for i in range(n)]
    return [Sample(s.prompt, s.output_len) for s in picked]  # sent one at a time: no arrival


def steady_rate(done_at: list[float], concurrency: int) -> float:
    """Completions per second of a closed loop of N requests, from the `concurrency`-th
    completion (the first wave, all sent at once, is over) to the (N - concurrency)-th (the
    last request is sent then, so the loop drains after it); the whole span when too few."""
    t = sorted(done_at)
    lo, hi = concurrency - 1, len(t) - concurrency - 1
    if hi - lo < 2:
        lo, hi = 0, len(t) - 1
    if hi <= lo or t[hi] <= t[lo]:
        raise ValueError(f"too few completions to measure a rate: {len(t)}")
    return (hi - lo) / (t[hi] - t[lo])


async def capacity(backend: Backend, window: list[Sample], concurrency: int) -> dict:
    """Closed-loop throughput (bench.overload step 1)."""
    todo = list(window)
    done_at: list[float] = []
    results: list[RequestResult] = []
    start = time.perf_counter()

    async def loop() -> None:
        while todo:
            r = await backend.send(todo.pop(0))
            results.append(r)
            if r.success:
                done_at.append(time.perf_counter() - start)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    duration = time.perf_counter() - start
    # with the latencies and where the prompts ran: a throughput gap between deployments
    # shows there (e.g. prompts prefilled where they decode, stalling the batch)
    return {"rate": steady_rate(done_at, concurrency), "requests": len(window),
            "completed": len(done_at), "refused": sum(r.refused for r in results),
            "concurrency": concurrency, "duration": duration,
            "summary": summarize(results, duration)}


async def run_deployment(server: Server, r: Replay, args, slo: Slo | None,
                         capacity_override: float | None) -> tuple[Slo, dict, list[dict]]:
    """Steps 0-2 on one started deployment: (the SLO, the capacity, one result per
    multiplier)."""
    plan = [(m, samples(r, args.num_prompts, 1000 * (i + 1))) for i, m in
            enumerate(args.multipliers)]
    cal = typical(samples(r, max(args.num_prompts, 32), 99), 6)
    cap_window = samples(r, args.capacity_prompts, 98)
    measured = [s for _, w in plan for s in w] + cal + cap_window
    plain = server.backend()
    try:
        for s in warmup_samples(measured, WARMUP, seed=97):
            await plain.send(s)
    finally:
        await plain.close()
    if slo is None:
        ttft0, tpot0 = await unloaded_latency(server.backend(), cal)
        slo = Slo(args.ttft_scale * ttft0, args.tpot_scale * tpot0)
        log(f"calibration: unloaded TTFT {ttft0:.0f} ms, TPOT {tpot0:.1f} ms -> SLO TTFT "
            f"{slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.1f} ms")
    if capacity_override:
        cap = {"rate": capacity_override, "given": True}
    else:
        plain = server.backend()
        try:
            cap = await capacity(plain, cap_window, args.capacity_concurrency)
        finally:
            await plain.close()
        await wait_idle(server.target, args.idle_timeout)
    log(f"{server.deployment.name} {r.trace}: capacity {cap['rate']:.3f} req/s")
    runs = []
    backend = server.backend(slo=slo)
    try:
        for m, window in plan:
            rate = m * cap["rate"]
            scale = time_scale_for(window, rate)
            timed = [Sample(s.prompt, s.output_len, s.arrival * scale) for s in window]
            results, duration = await run_load(backend, timed, rate)
            idle = await wait_idle(server.target, args.idle_timeout)
            run = summarize(results, duration, slo)
            failures = Counter(x.error[:160] for x in results if not x.success and not x.refused)
            run.update({"trace": r.trace, "deployment": server.deployment.name,
                        "multiplier": m, "request_rate": rate, "capacity": cap["rate"],
                        "time_scale": scale, "length_scale": r.length_scale,
                        "num_workers": server.deployment.workers,
                        "failure_reasons": dict(failures.most_common(5)),
                        "cluster_after": idle.as_dict()})
            runs.append(run)
            log(f"  {server.deployment.name:6} {r.trace:10} {m:g}x ({rate:.3f} req/s): "
                f"{run['completed']} ok, {run['refused']} refused, {run['failed']} failed; "
                f"admitted attainment {run['slo_admitted_attainment']:.0%}; refusal p99 "
                f"{run['p99_refusal_ms']:.1f} ms; leaked blocks {idle.leaked_blocks}")
    finally:
        await backend.close()
    return slo, cap, runs


def verdicts(runs: list[dict]) -> dict:
    """Each robustness target over `runs`: met or not, with the worst figure."""
    top = max((r["multiplier"] for r in runs), default=0)
    at_top = [r["slo_admitted_attainment"] for r in runs if r["multiplier"] == top]
    refusal = [r["p99_refusal_ms"] for r in runs if r["refused"]]
    leaked = sum(r["cluster_after"]["leaked_blocks"] for r in runs)
    return {
        "failed_after_admission": {"value": sum(r["failed"] for r in runs), "target": 0,
                                   "met": all(r["failed"] == 0 for r in runs)},
        f"admitted_attainment_at_{top:g}x": {
            "value": min(at_top, default=None), "target": TARGET_ADMITTED_ATTAINMENT,
            "met": bool(at_top) and min(at_top) >= TARGET_ADMITTED_ATTAINMENT},
        "p99_refusal_ms": {"value": max(refusal, default=None), "target": TARGET_REFUSAL_MS,
                           "met": all(x < TARGET_REFUSAL_MS for x in refusal)},
        "leaked_blocks": {"value": leaked, "target": 0, "met": leaked == 0},
    }


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.overload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="+", choices=sorted(REPLAYS),
                    default=["mooncake", "azure-conv"])
    ap.add_argument("--deployments", nargs="+", choices=["1p1d", "2colo", "adaptive"],
                    default=["1p1d", "2colo"],
                    help="the SLOs are calibrated on the first (default: %(default)s); "
                    "adaptive: 2 workers whose roles the controller sets, placed and "
                    "admitted by the cost profile")
    ap.add_argument("--multipliers", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="request rates as multiples of the measured capacity")
    ap.add_argument("--num-prompts", type=int, default=32, help="measured requests per run")
    ap.add_argument("--capacity-prompts", type=int, default=32,
                    help="requests of the closed-loop capacity measurement")
    ap.add_argument("--capacity-concurrency", type=int, default=8)
    ap.add_argument("--capacity", type=float, default=None,
                    help="skip the measurement: this capacity (req/s) for every deployment")
    ap.add_argument("--ttft-scale", type=float, default=5.0,
                    help="TTFT SLO = this x the unloaded median TTFT")
    ap.add_argument("--tpot-scale", type=float, default=3.0)
    ap.add_argument("--slo-ttft-ms", type=float, default=None,
                    help="with --slo-tpot-ms: these SLOs instead of a calibration")
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--idle-timeout", type=float, default=30.0,
                    help="seconds the cluster has to free everything after a run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=50091)
    ap.add_argument("--out", type=Path, default=Path("bench/results/overload"))
    ap.add_argument("--json", type=Path, default=None, help="default: OUT/overload.json")
    ap.add_argument("--plot", type=Path, default=None, help="default: OUT/overload.png")
    args = ap.parse_args(argv)
    path = args.json or args.out / "overload.json"
    plot = args.plot or args.out / "overload.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    given = (Slo(args.slo_ttft_ms, args.slo_tpot_ms)
             if args.slo_ttft_ms is not None and args.slo_tpot_ms is not None else None)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
                    "command": " ".join(["python -m pdserve.bench.overload",
                                         *(argv if argv is not None else sys.argv[1:])]),
                    "replays": {t: asdict(REPLAYS[t]) for t in args.traces},
                    "slo": {}, "capacity": {}, "runs": []}
    for trace in args.traces:
        slo = given
        for name in args.deployments:
            server = Server(DEPLOYMENTS[name], args.model, args.port, None, log_name="overload")
            try:
                slo, cap, runs = asyncio.run(run_deployment(server, REPLAYS[trace], args, slo,
                                                            args.capacity))
            finally:
                server.stop()
            result["slo"][trace] = asdict(slo)
            result["capacity"][f"{trace}/{name}"] = cap
            result["runs"] += runs
            result["verdicts"] = verdicts(result["runs"])
            result["verdicts_by_run"] = {
                f"{t}/{d}": verdicts([x for x in result["runs"]
                                      if x["trace"] == t and x["deployment"] == d])
                for t, d in sorted({(x["trace"], x["deployment"]) for x in result["runs"]})}
            path.write_text(json.dumps(result, indent=1, default=float))  # after each one
    from pdserve.bench.robustness_plots import plot_overload

    plot_overload(result, plot)
    for key, v in result["verdicts"].items():
        log(f"{key}: {v['value']} (target {v['target']}): {'met' if v['met'] else 'NOT met'}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
