"""The requests a simulation runs: prompt and output lengths and arrival times (the
simulator needs no token ids).

Up to `EXACT_UP_TO` requests, they are `pdserve bench`'s own (bench.serve_bench's
build_samples, seed for seed), so a simulated run and a measured one see the same
requests. Past that, drawing token ids would cost more than simulating, so the lengths are
drawn alone from the same distributions (random: uniform in [L(1 - r), L(1 + r)] after the
shared prefix) and a trace is replayed as many times as it takes, each copy after the last.
Arrivals: the trace's own times scaled by `--time-scale`, or, with a rate, gamma gaps as
`pdserve bench` draws them (bench.workload.arrival_times); `rate_scaled` stretches a
trace's gaps to a given rate instead.

`sweep_requests` draws a `pdserve bench sweep` run's requests instead (bench.sweep_workloads:
chat, summarize, the traces, shifting), the prompts and arrivals of that run as the sweep
sends them (its run_load: the samples' own arrival times where they have them).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from pdserve.bench.serve_bench import build_samples
from pdserve.bench.sweep_workloads import WORKLOADS, Workload, samples_for
from pdserve.bench.workload import TRACES, _azure_rows, _mooncake_rows, arrival_times

EXACT_UP_TO = 20_000


@dataclass(frozen=True)
class Requests:
    prompt_lens: list[int]
    output_lens: list[int]
    trace_times: list[float] | None  # a trace's own arrival times (time-scaled), else None

    def arrivals(self, rate: float, burstiness: float, seed: int,
                 rate_scaled: bool = False) -> list[float]:
        """Send times: a trace's own (or, `rate_scaled`, its gaps stretched to `rate`), else
        drawn at `rate`."""
        n = len(self.prompt_lens)
        if self.trace_times is None:
            return arrival_times(n, rate, burstiness, seed)
        if not rate_scaled:
            return self.trace_times
        span = max(self.trace_times[-1], 1e-9)
        stretch = n / rate / span
        return [t * stretch for t in self.trace_times]


def requests(args, seed: int, exact: bool | None = None) -> Requests:
    """What `pdserve bench` would send with these flags (see the module); `exact`: its very
    requests (True), lengths drawn alone (False), or the former up to EXACT_UP_TO (None)."""
    if exact is None:
        exact = args.num_prompts <= EXACT_UP_TO
    if exact:
        samples = build_samples(with_args(args, seed=seed))
        times = ([s.arrival for s in samples] if args.dataset != "random" else None)
        return Requests([len(s.prompt) for s in samples], [s.output_len for s in samples],
                        times)
    if args.dataset == "random":
        rng = np.random.default_rng(seed)
        return Requests(_uniform(rng, args.num_prompts, args.input_len, args.range_ratio,
                                 args.prefix_len),
                        _uniform(rng, args.num_prompts, args.output_len, args.range_ratio, 0),
                        None)
    return _tiled_trace(args)


def _uniform(rng, n: int, mean: int, ratio: float, prefix: int) -> list[int]:
    lo, hi = int(mean * (1 - ratio)), int(mean * (1 + ratio))
    return (np.maximum(1, rng.integers(lo, hi + 1, size=n)) + prefix).tolist()


def _tiled_trace(args) -> Requests:
    path = args.traces_dir / TRACES[args.dataset]
    rows = (_mooncake_rows if args.dataset == "mooncake" else _azure_rows)(path, 10**9)
    t0 = rows[0][0]
    one = [((t - t0) * args.time_scale,
            min(max(1, round(i * args.length_scale)), args.max_input_len or 10**9),
            min(max(1, round(o * args.length_scale)), args.max_output_len))
           for t, i, o, _ in rows]
    span = one[-1][0] + (one[-1][0] / max(len(one) - 1, 1))  # a copy starts a gap later
    prompts, outputs, times = [], [], []
    copy = 0
    while len(prompts) < args.num_prompts:
        for t, i, o in one:
            if len(prompts) == args.num_prompts:
                break
            times.append(t + copy * span)
            prompts.append(i)
            outputs.append(o)
        copy += 1
    return Requests(prompts, outputs, times)


def with_args(args: argparse.Namespace, **changes) -> argparse.Namespace:
    """A copy of parsed flags with some changed."""
    return argparse.Namespace(**{**vars(args), **changes})


def sweep_requests(workload: str | Workload, n: int, seed: int, rate_index: int, rate: float
                   ) -> tuple[list[int], list[int], list[float]]:
    """(prompt lengths, output lengths, arrival times) of the sweep's run of `n` requests
    of `workload` (a name, or the sweep JSON's Workload) at `rate`, the `rate_index`-th
    (from 0) of its rates, with `seed`."""
    w = WORKLOADS[workload] if isinstance(workload, str) else workload
    samples = samples_for(w, n, seed, rate_index + 1, rate)
    if all(s.arrival is not None for s in samples):
        times = [s.arrival for s in samples]
    else:
        times = arrival_times(n, rate, 1.0, seed)
    return [len(s.prompt) for s in samples], [s.output_len for s in samples], times
