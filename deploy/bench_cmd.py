"""`pdserve bench`: the load generator (`pdserve.bench.serve_bench`) and the experiments
that start their own servers: `pdserve bench sweep` (SLO / goodput, `pdserve.bench.sweep`),
`bench overload` (trace replays past capacity, `pdserve.bench.overload`), `bench soak`
(many concurrent streams for a long time, `pdserve.bench.soak`) and `bench frontends` (the
same workload through the gRPC and the HTTP API, `pdserve.bench.frontends`).

All run in this process, from the installed package: every path argument (`--json`,
`--traces-dir`, `--out`, ...) is relative to the caller's working directory, and every
argument after `bench` (or `bench EXPERIMENT`) is the benchmark's own, `--help` included.
"""

from __future__ import annotations

import argparse


def add_bench(sub) -> None:
    """The `bench` entry of `pdserve --help`; `main` hands its arguments to `run_bench`."""
    p = sub.add_parser("bench", help="load-test a server; `bench sweep|overload|soak|frontends` "
                                     "run experiments that start their own servers",
                       description="`pdserve bench [ARGS]` is the load generator (see "
                                   "`pdserve bench --help`); `pdserve bench sweep [ARGS]` the "
                                   "SLO / goodput experiments, `bench overload` trace replays "
                                   "past capacity, `bench soak` a long many-stream soak, "
                                   "`bench frontends` gRPC against HTTP (each with its own "
                                   "--help).",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)


# each starts servers: they need the server extra
EXPERIMENTS = ("sweep", "overload", "soak", "frontends")


def is_experiment(rest: list[str]) -> bool:
    """Whether REST names an experiment that starts its own servers."""
    return rest[:1] != [] and rest[0] in EXPERIMENTS


def run_bench(rest: list[str]) -> int:
    """`pdserve bench REST`: the named experiment's `main` when REST starts with one, else
    the load generator's; their exit status."""
    import importlib  # the benchmark modules: `pdserve --help` and other commands need none

    if is_experiment(rest):
        return importlib.import_module(f"pdserve.bench.{rest[0]}").main(rest[1:])
    return importlib.import_module("pdserve.bench.serve_bench").main(rest)
