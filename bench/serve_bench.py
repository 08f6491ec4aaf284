"""The serving load generator, `pdserve bench`: open-loop arrivals against pdserve's gRPC API
or an OpenAI-compatible server, vLLM's metrics, SLO attainment, a JSON result.

`--warmup` requests go first, one at a time and untimed, drawn apart from the measured ones
(never the same prompt, no prefix block beyond what the measured prompts share). Paths are
relative to the working directory; trace datasets default to the traces this package ships.
`pdserve bench sweep` runs the SLO / goodput experiments (see its --help).

    pdserve bench --target 127.0.0.1:50051 --dataset random --input-len 512 --output-len 64 \\
        --num-prompts 32 --request-rate 0.5 --slo-ttft-ms 3000 --slo-tpot-ms 100 \\
        --json result.json
    pdserve bench --backend openai --base-url http://127.0.0.1:8011 --model smollm2 ...
    pdserve bench --dataset mooncake --length-scale 0.05 --time-scale 20 ...  # trace replay
(also `python -m pdserve.bench.serve_bench ...`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pdserve.bench.backends import Backend, OpenAIBackend, PdServeBackend
from pdserve.bench.metrics import RequestResult, Slo, summarize
from pdserve.bench.workload import (
    DEFAULT_TRACES_DIR,
    TRACES,
    Sample,
    arrival_times,
    random_dataset,
    trace_dataset,
    warmup_samples,
)
from pdserve.rpc.credentials import add_credential_flags, credentials_from_args


async def run_load(backend: Backend, samples: list[Sample], rate: float,
                   burstiness: float = 1.0, max_concurrency: int | None = None,
                   seed: int = 0, progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send `samples` open-loop; (results in sample order, duration in seconds).
    Trace samples keep their own arrival times; others arrive at `rate`."""
    if all(s.arrival is not None for s in samples):
        times = [s.arrival for s in samples]
    else:
        times = arrival_times(len(samples), rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(samples), desc=f"{backend.name} @ {rate:g} req/s", file=sys.stderr,
               disable=not progress, leave=False)

    async def one(sample: Sample) -> RequestResult:
        if limit is None:
            result = await backend.send(sample)
        else:
            async with limit:
                result = await backend.send(sample)
        bar.update()
        return result

    start = time.perf_counter()
    tasks = []
    for sample, at in zip(samples, times, strict=True):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(sample)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def print_summary(result: dict, title: str = "Serving Benchmark Result") -> None:
    """One screen, in the shape of vLLM's benchmark output."""
    line = "=" * 60
    print(f"{line}\n{title:^60}\n{line}")
    rows = [("Successful requests:", result["completed"]),
            ("Failed requests:", result["failed"]),
            ("Refused requests:", result["refused"]),
            ("Benchmark duration (s):", f"{result['duration']:.2f}"),
            ("Total input tokens:", result["total_input_tokens"]),
            ("Total generated tokens:", result["total_output_tokens"]),
            ("Request throughput (req/s):", f"{result['request_throughput']:.3f}"),
            ("Output token throughput (tok/s):", f"{result['output_throughput']:.2f}")]
    if "slo_attainment" in result:
        rows += [("Request goodput (req/s):", f"{result['request_goodput']:.3f}"),
                 (f"SLO attainment (TTFT {result['slo_ttft_ms']:.0f} ms, "
                  f"TPOT {result['slo_tpot_ms']:.0f} ms):", f"{result['slo_attainment']:.1%}"),
                 ("SLO attainment of admitted requests:",
                  f"{result['slo_admitted_attainment']:.1%}")]
    for label, value in rows:
        print(f"{label:<48}{value:>12}")
    metrics = [("ttft", "Time to First Token"), ("tpot", "Time per Output Token"),
               ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")]
    if result["refused"]:
        metrics.append(("refusal", "Refusal Latency"))
    for metric, name in metrics:
        print(f"{'-' * 20}{name:^20}{'-' * 20}")
        for key in sorted(k for k in result
                          if k.endswith(f"_{metric}_ms") and not k.startswith("slo_")):
            label = key.removesuffix(f"_{metric}_ms").replace("_", " ").capitalize()
            print(f"{label + ' ' + metric.upper() + ' (ms):':<48}{result[key]:>12.2f}")
    if result.get("disagg_requests"):
        print(f"{'-' * 20}{'Server stages (mean)':^20}{'-' * 20}")
        for key in sorted(k for k in result if k.startswith("disagg_mean_")):
            label = key.removeprefix("disagg_mean_").removesuffix("_ms").replace("_", " ")
            print(f"{label + ' (ms):':<48}{result[key]:>12.2f}")
        print(f"{'KV moved (MB):':<48}{result['disagg_kv_bytes'] / 1e6:>12.1f}")
    print(line)


def build_samples(args) -> list[Sample]:
    """The measured requests."""
    if args.dataset == "random":
        return random_dataset(args.num_prompts, args.input_len, args.output_len,
                              args.range_ratio, args.prefix_len, args.vocab_size, args.seed)
    return trace_dataset(args.dataset, args.traces_dir, args.num_prompts, args.length_scale,
                         args.time_scale, args.max_input_len, args.max_output_len,
                         args.vocab_size, args.seed)


def build_warmup(args, samples: list[Sample]) -> list[Sample]:
    """`--warmup` untimed requests, drawn apart from `samples` (workload.warmup_samples)."""
    shared = args.prefix_len if args.dataset == "random" else 0
    return warmup_samples(samples, args.warmup, shared, args.vocab_size, args.seed)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backend", choices=["pdserve", "openai"], default="pdserve",
                    help="pdserve's gRPC API or an OpenAI-compatible HTTP server")
    ap.add_argument("--target", default="127.0.0.1:50051", help="pdserve gRPC HOST:PORT")
    add_credential_flags(ap)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="openai backend URL")
    ap.add_argument("--model", default="smollm2", help="openai backend model name")
    ap.add_argument("--disaggregation", choices=["auto", "always", "never"], default="auto",
                    help="pdserve's hint (over HTTP too: the `disaggregation` field)")
    ap.add_argument("--dataset", choices=["random", *TRACES], default="random",
                    help="random token ids, or a trace replayed with its arrival times")
    ap.add_argument("--traces-dir", type=Path, default=DEFAULT_TRACES_DIR,
                    help="folder of the trace files (default: the traces shipped with pdserve)")
    ap.add_argument("--num-prompts", type=int, default=32, help="measured requests")
    ap.add_argument("--input-len", type=int, default=512, help="random: prompt tokens")
    ap.add_argument("--output-len", type=int, default=64, help="random: output tokens")
    ap.add_argument("--range-ratio", type=float, default=0.0,
                    help="random: lengths uniform in [L(1 - r), L(1 + r)]")
    ap.add_argument("--prefix-len", type=int, default=0, help="shared prefix (random)")
    ap.add_argument("--length-scale", type=float, default=1.0, help="traces: length factor")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="traces: gap factor (2 replays at half the rate)")
    ap.add_argument("--max-input-len", type=int, default=None)
    ap.add_argument("--max-output-len", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=49152)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="req/s (default: all at once); traces keep their own times")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed requests first, none of them among the measured ones")
    ap.add_argument("--slo-ttft-ms", type=float, default=None,
                    help="with --slo-tpot-ms: SLO attainment and goodput")
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--send-slo", action="store_true",
                    help="pdserve (gRPC or HTTP): send the SLO with every request, so the "
                         "router's admission judges each request by it (default: the server's "
                         "--default-ttft-slo)")
    ap.add_argument("--percentiles", type=float, nargs="+", default=[50, 90, 99])
    ap.add_argument("--kv-bytes-per-token", type=int, default=2 * 30 * 3 * 64 * 4,
                    help="for the KV bytes moved (default: SmolLM2 fp32)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--label", default="", help="written into the JSON result")


def make_backend(args) -> Backend:
    slo = _slo(args) if args.send_slo else None
    if args.send_slo and slo is None:
        raise SystemExit("--send-slo needs --slo-ttft-ms and --slo-tpot-ms")
    if args.backend == "pdserve":
        return PdServeBackend(args.target, args.disaggregation, slo=slo,
                              credentials=credentials_from_args(args))
    # pdserve's own fields, for its HTTP API; other servers get none unless asked
    extra: dict = {}
    if args.disaggregation != "auto":
        extra["disaggregation"] = args.disaggregation
    if slo is not None:
        extra["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
    return OpenAIBackend(args.base_url, args.model, extra_body=extra)


def _slo(args) -> Slo | None:
    if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
        return None
    return Slo(args.slo_ttft_ms, args.slo_tpot_ms)


async def bench(args) -> dict:
    samples = build_samples(args)
    warmup = build_warmup(args, samples)
    backend = make_backend(args)
    try:
        for s in warmup:  # sequential and untimed: connections warm up
            await backend.send(s)
        results, duration = await run_load(backend, samples, args.request_rate,
                                           args.burstiness, args.max_concurrency, args.seed)
        workers = await _workers(args) if args.backend == "pdserve" else {}
    finally:
        await backend.close()
    slo = _slo(args)
    result = summarize(results, duration, slo, args.percentiles, args.kv_bytes_per_token)
    result.update({"backend": args.backend, "dataset": args.dataset, "label": args.label,
                   "request_rate": args.request_rate, "burstiness": args.burstiness,
                   "max_concurrency": args.max_concurrency, "seed": args.seed,
                   "warmup_requests": len(warmup),
                   "length_scale": args.length_scale, "time_scale": args.time_scale,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), **workers})
    return result


async def _workers(args) -> dict:
    from pdserve.rpc.client import PdServeClient

    async with PdServeClient(args.target) as client:
        status = await client.cluster_status(timeout=10)
    roles = [w.role for w in status.workers]
    return {f"num_{r}_workers": roles.count(r) for r in ("prefill", "decode", "colocated")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    result = asyncio.run(bench(args))
    print_summary(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
