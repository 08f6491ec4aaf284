"""A soak through one router: `--streams` concurrent client streams of short requests for
`--duration` seconds; the resident memory of every process of the deployment over time,
leaked KV blocks at the end, hung streams.

1. One deployment starts through `pdserve serve --no-ray --pin-cores` (bench.server); two
   warm-up requests.
2. Each stream sends a short request (random tokens, `--input-len` / `--output-len`,
   ±`--range-ratio`), waits for its end, and sends the next, until the duration is over. A
   request refused at the door (RESOURCE_EXHAUSTED) or failed is retried after
   `--retry-after` seconds (±50% jitter), so refused streams do not spin on the router.
   A request with no final message and no status within `--hang-after` seconds is *hung*
   (the client then cancels it); one that ends with neither is counted `no_final`.
3. Every `--sample-every` seconds: the RSS of every process (bench.procs: router, each
   worker by id, redis) and the counts so far. Start = before the load, middle = half-way,
   end = when the load stops; the RSS is *bounded* when no process grew from middle to end
   by more than `--rss-tolerance` (the first half includes the KV pool's pages being
   touched for the first time, which is not a leak; the second half repeats the same work).
4. The load stops, every stream ends (bounded by --hang-after), and the cluster must go
   idle with every KV block free on every worker (bench.cluster).

    python -m pdserve.bench.soak --streams 1000 --duration 600 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pdserve.bench.backends import Backend
from pdserve.bench.cluster import cluster_status, wait_idle
from pdserve.bench.metrics import RequestResult, summarize
from pdserve.bench.procs import name_processes, rss_of
from pdserve.bench.server import DEPLOYMENTS, Server
from pdserve.bench.workload import random_dataset

MB = 1 << 20
RSS_SLACK_MB = 32.0  # growth below this is noise (allocator arenas), whatever the ratio


@dataclass
class Tally:
    """Every request the streams sent, as it ended."""

    results: list[RequestResult] = field(default_factory=list)
    hung: int = 0
    in_flight: int = 0

    def counts(self) -> dict[str, int]:
        c = Counter("ok" if r.success else "refused" if r.refused else r.code or "error"
                    for r in self.results)
        return {"ok": c.pop("ok", 0), "refused": c.pop("refused", 0),
                "failed": sum(c.values()), "hung": self.hung, "in_flight": self.in_flight}


async def stream(backend: Backend, tally: Tally, stop_at: float, make: random.Random,
                 args) -> None:
    """One client stream: request after request until `stop_at` (time.monotonic)."""
    while time.monotonic() < stop_at:
        sample = random_dataset(1, args.input_len, args.output_len, args.range_ratio,
                                seed=make.getrandbits(63))[0]
        tally.in_flight += 1
        try:
            result = await asyncio.wait_for(backend.send(sample), args.hang_after)
        except asyncio.TimeoutError:
            tally.hung += 1
            continue
        finally:
            tally.in_flight -= 1
        tally.results.append(result)
        if not result.success:
            await asyncio.sleep(args.retry_after * make.uniform(0.5, 1.5))


async def sample_rss(server: Server, tally: Tally, t0: float,
                     workers: list[tuple[str, str, str]]) -> dict:
    """One sample: seconds since the load began, RSS (MB) per process, counts so far.
    `workers` (id, role, KV endpoint) names the worker processes; it is refreshed from the
    router when it answers in time, and kept as it was when a busy router does not."""
    try:
        workers[:] = [(w.worker_id, w.role, w.kv_endpoint)
                      for w in await cluster_status(server.target)]
    except Exception:  # noqa: BLE001 - grpc errors: the last known names still hold
        pass
    names = name_processes(server.proc.pid, workers)
    return {"t": time.monotonic() - t0,
            "rss_mb": {n: b / MB for n, b in sorted(rss_of(names).items())},
            "pids": {n: pid for pid, n in names.items()}, **tally.counts()}


def growth(samples: list[dict], start_t: float, end_t: float, tolerance: float) -> dict:
    """Per process: RSS (MB) at the samples nearest `start_t` and `end_t`, and whether it
    stayed within `tolerance` (a fraction, plus RSS_SLACK_MB)."""
    a = min(samples, key=lambda s: abs(s["t"] - start_t))["rss_mb"]
    b = min(samples, key=lambda s: abs(s["t"] - end_t))["rss_mb"]
    return {n: {"from_mb": a[n], "to_mb": b[n],
                "bounded": b[n] <= a[n] * (1 + tolerance) + RSS_SLACK_MB}
            for n in sorted(a.keys() & b.keys())}


async def soak(server: Server, args) -> dict:
    backend = server.backend(timeout_s=args.hang_after + 60)  # our bound fires first
    tally = Tally()
    samples: list[dict] = []
    workers: list[tuple[str, str, str]] = []
    try:
        for s in random_dataset(2, args.input_len, args.output_len, seed=-1):
            await backend.send(s)
        t0 = time.monotonic()
        samples.append(await sample_rss(server, tally, t0, workers))
        stop_at = t0 + args.duration
        seeds = random.Random(args.seed)
        tasks = [asyncio.ensure_future(stream(backend, tally, stop_at,
                                              random.Random(seeds.getrandbits(63)), args))
                 for _ in range(args.streams)]
        bar = tqdm(total=int(args.duration), desc=f"soak, {args.streams} streams",
                   unit="s", file=sys.stderr)
        while (now := time.monotonic()) < stop_at:
            await asyncio.sleep(min(args.sample_every, stop_at - now))
            samples.append(await sample_rss(server, tally, t0, workers))
            bar.n = min(int(samples[-1]["t"]), int(args.duration))
            total = sum(samples[-1]["rss_mb"].values())
            bar.set_postfix({k: samples[-1][k] for k in ("ok", "refused", "failed", "hung")}
                            | {"rss_mb": f"{total:.0f}"})
        bar.close()
        end = samples[-1]
        drain_start = time.monotonic()
        await asyncio.gather(*tasks)
        drained_s = time.monotonic() - drain_start
    finally:
        await backend.close()
    idle = await wait_idle(server.target, args.idle_timeout)
    after = await sample_rss(server, tally, t0, workers)
    load_s = end["t"]
    summary = summarize(tally.results, load_s + drained_s)
    for key in ("ttfts", "tpots", "output_lens", "input_lens", "errors"):
        summary.pop(key)  # per-request lists: thousands of entries, and no CDF is drawn
    counts = tally.counts()
    middle = growth(samples, load_s / 2, load_s, args.rss_tolerance)
    return {
        "streams": args.streams, "duration": args.duration, "drain_s": drained_s,
        "deployment": server.deployment.name, "counts": counts,
        "failure_reasons": dict(Counter(r.error[:160] for r in tally.results
                                        if not r.success and not r.refused).most_common(5)),
        "metrics": summary, "samples": samples, "after": after,
        "rss_mb": {n: {"start": samples[0]["rss_mb"].get(n),
                       "middle": min(samples, key=lambda s: abs(s["t"] - load_s / 2))
                       ["rss_mb"].get(n),
                       "end": end["rss_mb"].get(n), "after": after["rss_mb"].get(n)}
                   for n in sorted(end["rss_mb"])},
        "rss_growth_middle_to_end": middle,
        "restarted": sorted(n for n in end["pids"]
                            if samples[0]["pids"].get(n, end["pids"][n]) != end["pids"][n]),
        "cluster_after": idle.as_dict(),
        "verdicts": {
            "hung_streams": {"value": counts["hung"], "target": 0, "met": counts["hung"] == 0},
            "no_final": {"value": sum(r.code == "NO_FINAL" for r in tally.results),
                         "target": 0,
                         "met": not any(r.code == "NO_FINAL" for r in tally.results)},
            "leaked_blocks": {"value": idle.leaked_blocks, "target": 0,
                              "met": idle.idle and idle.leaked_blocks == 0},
            "rss_bounded": {"value": sorted(n for n, g in middle.items() if not g["bounded"]),
                            "target": [], "met": all(g["bounded"] for g in middle.values())},
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployment", choices=["1p1d", "2colo"], default="1p1d")
    ap.add_argument("--streams", type=int, default=1000, help="concurrent client streams")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--input-len", type=int, default=32, help="prompt tokens (mean)")
    ap.add_argument("--output-len", type=int, default=16, help="output tokens (mean)")
    ap.add_argument("--range-ratio", type=float, default=0.5,
                    help="lengths uniform in [L(1 - r), L(1 + r)]")
    ap.add_argument("--retry-after", type=float, default=1.0,
                    help="seconds a stream waits after a refusal or failure (±50%%)")
    ap.add_argument("--hang-after", type=float, default=120.0,
                    help="a request with no end after this many seconds is hung")
    ap.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling, seconds")
    ap.add_argument("--rss-tolerance", type=float, default=0.10,
                    help="bounded: middle -> end growth below this fraction (+32 MB)")
    ap.add_argument("--idle-timeout", type=float, default=30.0,
                    help="seconds the cluster has to free everything after the load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=50092)
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    ap.add_argument("--json", type=Path, default=None, help="default: OUT/soak.json")
    ap.add_argument("--plot", type=Path, default=None, help="default: OUT/soak.png")
    args = ap.parse_args(argv)
    path = args.json or args.out / "soak.json"
    plot = args.plot or args.out / "soak.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    server = Server(DEPLOYMENTS[args.deployment], args.model, args.port, None, log_name="soak")
    try:
        result = asyncio.run(soak(server, args))
    finally:
        server.stop()
    result.update({"date": time.strftime("%Y-%m-%d %H:%M"),
                   "command": " ".join(["python -m pdserve.bench.soak",
                                        *(argv if argv is not None else sys.argv[1:])]),
                   "request": {"input_len": args.input_len, "output_len": args.output_len,
                               "range_ratio": args.range_ratio}})
    path.write_text(json.dumps(result, indent=1, default=float))
    from pdserve.bench.robustness_plots import plot_soak

    plot_soak(result, plot)
    print(f"requests: {result['counts']}", file=sys.stderr)
    for name, rss in result["rss_mb"].items():
        print(f"  {name:18} RSS MB start {rss['start'] or 0:7.1f}  middle {rss['middle'] or 0:7.1f}"
              f"  end {rss['end'] or 0:7.1f}  after {rss['after'] or 0:7.1f}", file=sys.stderr)
    for key, v in result["verdicts"].items():
        print(f"{key}: {v['value']} (target {v['target']}): "
              f"{'met' if v['met'] else 'NOT met'}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
