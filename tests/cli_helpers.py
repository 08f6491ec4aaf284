"""`pdserve` run as a user runs it: in a fresh interpreter, optionally without some modules
(an install without the extra that provides them)."""

from __future__ import annotations

import subprocess
import sys


def run_cli(args: list[str], cwd, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`pdserve ARGS` with the modules in `block` made unimportable (None in sys.modules)."""
    code = ("import sys\n"
            f"for name in {block!r}:\n"
            "    sys.modules[name] = None\n"
            "from pdserve.deploy.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
