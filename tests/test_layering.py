"""The import rules of DESIGN §1, checked on the source tree (AST, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["rpc", "engine", "kvtransfer", "prefill_worker", "decode_worker", "router",
            "deploy", "bench"]
# package -> project packages it may import (itself always allowed)
ALLOWED = {
    "rpc": set(),
    "engine": set(),
    "kvtransfer": set(),
    "prefill_worker": {"engine", "kvtransfer", "rpc"},
    "decode_worker": {"engine", "kvtransfer", "rpc"},
    "router": {"rpc"},
    "deploy": {"rpc", "engine", "kvtransfer", "prefill_worker", "decode_worker", "router"},
    # microbenchmarks below the public API: the engine, the transports, and the workers in
    # local processes (deploy.local), as `pdserve serve` would place them
    "bench": {"rpc", "engine", "kvtransfer", "prefill_worker", "decode_worker", "deploy"},
}
# third-party modules a package must never import
FORBIDDEN = {
    "router": {"torch"},
    "engine": {"ray", "zmq", "grpc", "redis"},
    "kvtransfer": {"ray", "grpc", "redis"},
    "rpc": {"torch", "ray"},
    "prefill_worker": {"ray"},
    "decode_worker": {"ray"},
    "bench": {"ray"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_packages_respect_the_import_rules():
    violations = []
    checked = 0
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            checked += 1
            rel = path.relative_to(ROOT)
            for name in _imports(path):
                if name in ALLOWED and name != pkg and name not in ALLOWED[pkg]:
                    violations.append(f"{rel} imports {name}")
                if name in FORBIDDEN.get(pkg, set()):
                    violations.append(f"{rel} imports {name}")
    assert checked > 10
    assert not violations, "\n".join(violations)


def test_proto_is_not_a_python_package():
    # `proto` would shadow the proto-plus package users may have installed.
    assert not (ROOT / "proto" / "__init__.py").exists()
