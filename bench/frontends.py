"""What the HTTP API costs: the same workload through pdserve's gRPC API and its
OpenAI-compatible HTTP API (`bench.backends.OpenAIBackend`, SSE), side by side on one
running deployment (1P1D, `pdserve serve --no-ray --pin-cores`, every request
disaggregated), reported as HTTP / gRPC ratios.

1. warm-up: a few requests through each API, none of them measured;
2. latency: one request at a time (no queueing: what is measured is the request path),
   the two APIs taking turns, which one goes first alternating, `--num-prompts` x
   `--rounds` requests each: TTFT, TPOT, E2EL as vLLM's benchmark takes them on the client;
3. throughput: per round, `--num-prompts` requests through each API closed-loop,
   `--concurrency` at a time, the API that goes first alternating between rounds:
   output tokens per second.
Every request has fresh prompt tokens (no prefix-cache hit between the two APIs), and the
cluster must be idle with every KV block free at the end. Apart from the ratios, which carry
the workers' noise on a shared machine, what each API adds to TTFT is measured directly:
the client's TTFT minus the router's own (arrival at the router to its first token out),
per request; and the router process's CPU time per output token while each API's requests
ran (the router shares the machine's cores with the workers). The target: HTTP TTFT <= 1.05x
gRPC's, throughput within noise.

    python -m pdserve.bench.frontends --json bench/results/frontends.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from pdserve.bench.backends import Backend, OpenAIBackend, PdServeBackend
from pdserve.bench.cluster import wait_idle
from pdserve.bench.metrics import RequestResult, summarize
from pdserve.bench.serve_bench import run_load
from pdserve.bench.server import DEPLOYMENTS, Server
from pdserve.bench.workload import random_dataset, warmup_samples

APIS = ("grpc", "http")
TARGET_TTFT_RATIO = 1.05
RATIOS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_e2el_ms")


def backends(server: Server, model: str) -> dict[str, Backend]:
    return {"grpc": PdServeBackend(server.target, "always"),
            "http": OpenAIBackend(server.http_url, model,
                                  extra_body={"disaggregation": "always"})}


async def measure(server: Server, args) -> dict:
    per_run = args.num_prompts
    runs = 2 * args.rounds * len(APIS)  # both phases, every round, both APIs
    samples = random_dataset(runs * per_run, args.input_len, args.output_len, seed=args.seed)
    chunks = [samples[i:i + per_run] for i in range(0, len(samples), per_run)]
    clients = backends(server, args.model)
    latency: dict[str, list[RequestResult]] = {api: [] for api in APIS}
    latency_s = dict.fromkeys(APIS, 0.0)
    throughput: dict[str, list[RequestResult]] = {api: [] for api in APIS}
    throughput_s = dict.fromkeys(APIS, 0.0)
    cpu = dict.fromkeys(APIS, 0.0)  # the router process's, while each API's requests ran
    try:
        for api, sample in zip(APIS * args.warmup, warmup_samples(samples, 2 * args.warmup),
                               strict=True):
            await clients[api].send(sample)
        turns = [s for chunk in chunks[:len(APIS) * args.rounds] for s in chunk]
        for i in range(0, len(turns), len(APIS)):
            order = APIS if (i // len(APIS)) % 2 == 0 else APIS[::-1]
            for api, sample in zip(order, turns[i:i + len(APIS)], strict=True):
                before = cpu_s(server.proc.pid)
                result = await clients[api].send(sample)
                cpu[api] += cpu_s(server.proc.pid) - before
                latency[api].append(result)
                latency_s[api] += result.latency
        for api in APIS:
            done = summarize(latency[api], latency_s[api])
            log(f"latency {api:4}: {done['completed']}/{len(latency[api])} ok, mean TTFT "
                f"{done['mean_ttft_ms']:.0f} ms, mean TPOT {done['mean_tpot_ms']:.1f} ms")
        for r in range(args.rounds):
            for api in APIS if r % 2 == 0 else APIS[::-1]:
                before = cpu_s(server.proc.pid)
                results, duration = await run_load(clients[api], chunks.pop(), math.inf,
                                                   max_concurrency=args.concurrency,
                                                   progress=False)
                cpu[api] += cpu_s(server.proc.pid) - before
                throughput[api] += results
                throughput_s[api] += duration
                done = summarize(results, duration)
                log(f"throughput round {r} {api:4}: {done['completed']}/{len(results)} ok, "
                    f"{done['output_throughput']:.1f} tok/s")
    finally:
        for client in clients.values():
            await client.close()
    idle = await wait_idle(server.target, 30)
    out = {"apis": {}, "cluster_after": idle.as_dict()}
    for api in APIS:
        out["apis"][api] = {"latency": summarize(latency[api], latency_s[api]),
                            "throughput": summarize(throughput[api], throughput_s[api])}
    g, h = out["apis"]["grpc"], out["apis"]["http"]
    out["ratios"] = {key: _ratio(h["latency"][key], g["latency"][key]) for key in RATIOS}
    out["ratios"]["output_throughput"] = _ratio(h["throughput"]["output_throughput"],
                                                g["throughput"]["output_throughput"])
    # the API's own cost, free of the workers' noise: the client's TTFT minus the router's
    for api in APIS:
        added = [r.ttft * 1e3 - r.stages["first_token_ms"] for r in latency[api]
                 if r.success and r.stages.get("first_token_ms")]
        out["apis"][api]["added_ttft_ms"] = {
            "mean": statistics.fmean(added) if added else math.nan,
            "median": statistics.median(added) if added else math.nan}
        tokens = sum(r.output_len for r in latency[api] + throughput[api] if r.success)
        out["apis"][api]["router_cpu_ms_per_token"] = 1e3 * cpu[api] / tokens if tokens \
            else math.nan
    out["target_met"] = out["ratios"]["mean_ttft_ms"] <= TARGET_TTFT_RATIO
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.frontends", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=8,
                    help="measured requests per API, phase and round (%(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="%(default)s")
    ap.add_argument("--input-len", type=int, default=256, help="%(default)s")
    ap.add_argument("--output-len", type=int, default=32, help="%(default)s")
    ap.add_argument("--concurrency", type=int, default=4,
                    help="throughput phase: requests in flight (%(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="per API (%(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=50093, help="gRPC; HTTP picks a free port")
    ap.add_argument("--json", type=Path, default=Path("bench/results/frontends.json"))
    args = ap.parse_args(argv)
    server = Server(DEPLOYMENTS["1p1d"], args.model, args.port, None, log_name="frontends")
    try:
        result = asyncio.run(measure(server, args))
    finally:
        server.stop()
    result.update({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
                   "command": " ".join(["python -m pdserve.bench.frontends",
                                        *(argv if argv is not None else sys.argv[1:])]),
                   "workload": {k: getattr(args, k) for k in (
                       "num_prompts", "rounds", "input_len", "output_len", "concurrency")}})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float))
    for key, ratio in result["ratios"].items():
        log(f"HTTP / gRPC {key}: {ratio:.3f}")
    for api in APIS:
        added = result["apis"][api]["added_ttft_ms"]
        log(f"{api}: client TTFT - router TTFT: mean {added['mean']:.2f} ms, median "
            f"{added['median']:.2f} ms; router process CPU "
            f"{result['apis'][api]['router_cpu_ms_per_token']:.2f} ms per output token")
    log(f"target TTFT <= {TARGET_TTFT_RATIO}x: {'met' if result['target_met'] else 'NOT met'}")
    print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
