"""`pdserve simulate` and `pdserve plan`: the cluster simulator (`pdserve.bench.sim.run`)
and the placement planner on it (`pdserve.bench.sim.plan`). Both run in this process;
every argument after the command is theirs, `--help` included."""

from __future__ import annotations

import argparse

COMMANDS = {"simulate": "pdserve.bench.sim.run", "plan": "pdserve.bench.sim.plan"}


def add_sim(sub) -> None:
    """Their entries of `pdserve --help`; `main` hands their arguments to `run_sim`."""
    for name, about in (("simulate", "simulate a deployment under a workload on a cost "
                                     "profile (`pdserve bench`'s result, in seconds)"),
                        ("plan", "search deployments for the most goodput per worker under "
                                 "SLOs, by simulation")):
        p = sub.add_parser(name, help=about, add_help=False,
                           description=f"`pdserve {name} --help` tells its arguments.")
        p.add_argument("args", nargs=argparse.REMAINDER)


def run_sim(command: str, rest: list[str]) -> int:
    import importlib  # the simulator imports the router and the engine's meters

    return importlib.import_module(COMMANDS[command]).main(rest)
