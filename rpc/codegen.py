"""Generate the Python stubs in `rpc/` from `proto/` (`make proto`).

grpc_tools writes `from pdserve.v1 import pdserve_pb2`; the stubs live in `pdserve.rpc`,
so that import is rewritten. `generate(out_dir)` is what the staleness test runs
too, comparing its output with the checked-in files.

    .venv/bin/python -m pdserve.rpc.codegen
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTOS = ["pdserve/v1/pdserve.proto"]
OUT = ROOT / "rpc"
GENERATED = ["pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py"]


def generate(out_dir: Path) -> None:
    """Write the stubs of every proto into `out_dir` (flat)."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        for proto in PROTOS:
            folder = Path(tmp) / Path(proto).parent
            for path in sorted(folder.iterdir()):
                text = re.sub(r"^from pdserve\.v1 import ", "from pdserve.rpc import ",
                              path.read_text(), flags=re.M)
                (out_dir / path.name).write_text(text)


if __name__ == "__main__":
    generate(OUT)
    print(f"wrote {', '.join(GENERATED)} to {OUT}", file=sys.stderr)
