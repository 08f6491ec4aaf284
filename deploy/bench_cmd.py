"""`pdserve bench`: the load generator (`pdserve.bench.serve_bench`) and, as `pdserve bench
sweep`, the SLO / goodput experiments (`pdserve.bench.sweep`).

Both run in this process, from the installed package: every path argument (`--json`,
`--traces-dir`, `--out`, ...) is relative to the caller's working directory, and every
argument after `bench` (or `bench sweep`) is the benchmark's own, `--help` included.
"""

from __future__ import annotations

import argparse


def add_bench(sub) -> None:
    """The `bench` entry of `pdserve --help`; `main` hands its arguments to `run_bench`."""
    p = sub.add_parser("bench", help="load-test a server; `bench sweep` runs SLO experiments",
                       description="`pdserve bench [ARGS]` is the load generator (see "
                                   "`pdserve bench --help`); `pdserve bench sweep [ARGS]` the "
                                   "SLO / goodput experiments (`pdserve bench sweep --help`).",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)


def is_sweep(rest: list[str]) -> bool:
    return rest[:1] == ["sweep"]


def run_bench(rest: list[str]) -> int:
    """`pdserve bench REST`: the sweep's `main` when REST starts with `sweep`, else the load
    generator's; their exit status."""
    # imported here: `pdserve --help` and the other commands need neither
    if is_sweep(rest):
        from pdserve.bench import sweep

        return sweep.main(rest[1:])
    from pdserve.bench import serve_bench

    return serve_bench.main(rest)
