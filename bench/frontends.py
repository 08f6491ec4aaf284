"""What the HTTP API costs: the same workload through pdserve's gRPC API and its
OpenAI-compatible HTTP API (`bench.backends.OpenAIBackend`, SSE), side by side on one
running deployment (1P1D, `pdserve serve --no-ray --pin-cores`, every request
disaggregated), reported as HTTP / gRPC ratios.

1. warm-up: a few requests through each API, none of them measured;
2. latency: per round, `--num-prompts` requests through each API at `--request-rate`
   (Poisson), the API that goes first alternating between rounds so drift cancels: TTFT,
   TPOT, E2EL as vLLM's benchmark takes them on the client;
3. throughput: per round, as many requests through each API closed-loop,
   `--concurrency` at a time: output tokens per second.
Every request has fresh prompt tokens (no prefix-cache hit between the two APIs), and the
cluster must be idle with every KV block free at the end. The target: HTTP TTFT <= 1.05x
gRPC's, throughput within noise.

    python -m pdserve.bench.frontends --json bench/results/frontends.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
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
    try:
        for api, sample in zip(APIS * args.warmup, warmup_samples(samples, 2 * args.warmup),
                               strict=True):
            await clients[api].send(sample)
        for phase, rate, conc, into, took in (
                ("latency", args.request_rate, None, latency, latency_s),
                ("throughput", math.inf, args.concurrency, throughput, throughput_s)):
            for r in range(args.rounds):
                for api in APIS if r % 2 == 0 else APIS[::-1]:
                    results, duration = await run_load(clients[api], chunks.pop(), rate,
                                                       max_concurrency=conc, seed=r,
                                                       progress=False)
                    into[api] += results
                    took[api] += duration
                    done = summarize(results, duration)
                    log(f"{phase} round {r} {api:4}: {done['completed']}/{len(results)} ok, "
                        f"mean TTFT {done['mean_ttft_ms']:.0f} ms, "
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
    out["target_met"] = out["ratios"]["mean_ttft_ms"] <= TARGET_TTFT_RATIO
    return out


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
    ap.add_argument("--request-rate", type=float, default=0.5,
                    help="latency phase, req/s (%(default)s)")
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
                       "num_prompts", "rounds", "input_len", "output_len", "request_rate",
                       "concurrency")}})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float))
    for key, ratio in result["ratios"].items():
        log(f"HTTP / gRPC {key}: {ratio:.3f}")
    log(f"target TTFT <= {TARGET_TTFT_RATIO}x: {'met' if result['target_met'] else 'NOT met'}")
    print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
