"""`pdserve bench`: the load generator (`bench/serve_bench.py`) and, as `pdserve bench
sweep`, the SLO/goodput experiments (`bench/sweep.py`). They live in the source tree's
`bench/`, which talks to servers through the public API only; this command runs them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="load-test a server; `bench sweep` runs SLO experiments",
                       description="`pdserve bench [ARGS]` runs bench/serve_bench.py (see "
                                   "`pdserve bench --help`); `pdserve bench sweep [ARGS]` runs "
                                   "bench/sweep.py.", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)


def run_bench(rest: list[str]) -> int:
    if not (ROOT / "bench" / "serve_bench.py").is_file():
        print(f"pdserve bench: needs the source tree's bench/ folder ({ROOT / 'bench'})",
              file=sys.stderr)
        return 2
    module = "bench.serve_bench"
    if rest[:1] == ["sweep"]:
        module, rest = "bench.sweep", rest[1:]
    return subprocess.run([sys.executable, "-m", module, *rest], cwd=ROOT).returncode
