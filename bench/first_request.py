"""The first request to a fresh server against the later ones: start `pdserve serve --no-ray`
(the benchmarks' 1P1D deployment, bench.server: every prompt disaggregated, one core per
worker), send
`--requests` prompts one at a time, each of `--input-len` random token ids that share no
prefix (no prefix-cache hit can make a later one faster), and report each one's TTFT and
prefill compute time from its final message, and the first's over the last's.

    python -m pdserve.bench.first_request [--requests 10] [--runs 3] [--ray] [--json PATH]

Also: the time from launching `pdserve serve` to its ready line (warm workers registered).
With `--ray` the workers are actors of a local Ray instance.

The server runs under this interpreter; to measure another checkout of pdserve, run this
file with that checkout's interpreter (`/other/.venv/bin/python bench/first_request.py`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

import grpc

from pdserve.bench.server import DEPLOYMENTS, Server
from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc import pdserve_pb2_grpc


def one_run(model: str, port: int, requests: int, input_len: int, seed: int,
            ray: bool = False) -> dict:
    """The server's start-up time and each request's figures."""
    server = Server(DEPLOYMENTS["1p1d"], model, port, None, log_name="first-request", ray=ray)
    try:
        stub = pdserve_pb2_grpc.PdServeStub(grpc.insecure_channel(server.target))
        rng = random.Random(seed)
        firsts = rng.sample(range(1000, 40000), requests)  # distinct first tokens: no prefix
        out = []
        for first in firsts:
            req = pb.GenerateRequest(
                token_ids=[first] + [rng.randrange(1000, 40000) for _ in range(input_len - 1)])
            req.sampling.max_tokens, req.sampling.temperature = 8, 0.0
            req.sampling.ignore_eos = True
            final = [r.final for r in stub.Generate(req, timeout=120) if r.HasField("final")][0]
            t = final.timing
            out.append({"ttft_ms": t.first_token_ms, "router_queue_ms": t.router_queue_ms,
                        "prefill_queue_ms": t.prefill_queue_ms,
                        "prefill_compute_ms": t.prefill_compute_ms,
                        "kv_transfer_ms": t.kv_transfer_ms, "decode_queue_ms": t.decode_queue_ms})
        return {"ready_s": server.ready_s, "requests": out}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--input-len", type=int, default=42)
    ap.add_argument("--runs", type=int, default=1, help="fresh servers, one after another")
    ap.add_argument("--port", type=int, default=50071)
    ap.add_argument("--ray", action="store_true",
                    help="workers on a local Ray instance (default: --no-ray, pinned processes)")
    ap.add_argument("--json", default=None, help="write the per-request figures here")
    args = ap.parse_args()
    started = [one_run(args.model, args.port, args.requests, args.input_len, seed, args.ray)
               for seed in range(args.runs)]
    runs = [s["requests"] for s in started]
    ready = statistics.median(s["ready_s"] for s in started)
    result = {"input_len": args.input_len, "ray": args.ray, "ready_s": [s["ready_s"] for s in
                                                                        started], "runs": runs}
    print(f"ready after {ready:.1f} s from launch (median of {args.runs}; model and kernels "
          "cached)")
    for key in ("ttft_ms", "prefill_compute_ms"):
        first = statistics.median(run[0][key] for run in runs)
        last = statistics.median(run[-1][key] for run in runs)
        result[f"first_{key}"], result[f"last_{key}"] = first, last
        result[f"first_over_last_{key}"] = first / last
        print(f"{key:20} first {first:8.1f}  request {args.requests} {last:8.1f}  "
              f"ratio {first / last:5.2f}x  (median of {args.runs} fresh servers)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
