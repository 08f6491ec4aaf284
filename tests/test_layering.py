"""The import rules of DESIGN §1, checked on the source tree (AST, nothing imported), and the
torch-free parts checked again by importing them in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pdserve.<part> -> the parts it may import (itself always allowed)
ALLOWED = {
    "protocol": set(),
    "rpc": set(),
    "models": set(),
    "engine": {"protocol", "models"},
    "kvtransfer": set(),
    "worker": {"protocol", "engine", "kvtransfer"},
    "prefill_worker": {"protocol", "engine", "kvtransfer", "worker"},
    "decode_worker": {"protocol", "engine", "kvtransfer", "worker"},
    "router": {"protocol", "rpc"},
    "deploy": {"protocol", "rpc", "models", "engine", "kvtransfer", "worker", "prefill_worker",
               "decode_worker", "router", "bench"},
    # microbenchmarks below the public API: the engine, the transports, and the workers in
    # local processes (deploy.local), as `pdserve serve` would place them; the simulator
    # (bench.sim) runs the router's own admission and routing functions
    "bench": {"protocol", "rpc", "models", "engine", "kvtransfer", "worker", "prefill_worker",
              "decode_worker", "deploy", "router"},
    "pdserve": {"deploy"},  # the root package: `python -m pdserve` runs the CLI
}
FOLDERS = {part: ROOT / part for part in ALLOWED}
# third-party modules a part must never import
FORBIDDEN = {
    "router": {"torch", "ray", "transformers"},
    "rpc": {"torch", "ray", "zmq", "redis", "transformers"},
    "engine": {"ray", "zmq", "grpc", "redis"},
    "models": {"ray", "zmq", "grpc", "redis"},
    "kvtransfer": {"ray", "grpc", "redis"},
    "worker": {"ray", "grpc", "redis"},
    "prefill_worker": {"ray", "grpc", "redis"},
    "decode_worker": {"ray", "grpc", "redis"},
    "bench": {"ray"},
}
# the contract imports the standard library and these only
PROTOCOL_THIRD_PARTY = {"msgpack", "xxhash", "tokenizers"}


def _imports(path: Path) -> set[str]:
    """Dotted names of the modules `path` imports (absolute imports only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _violations(part: str, rel: Path, name: str) -> list[str]:
    top, _, rest = name.partition(".")
    if top in ALLOWED and top != "pdserve":
        return [f"{rel} imports {name}: the project's parts are imported as pdserve.{top}"]
    if top == "pdserve":
        sub = rest.split(".")[0]
        if sub and sub != part and sub not in ALLOWED[part]:
            return [f"{rel} imports {name}"]
        return []
    if top in FORBIDDEN.get(part, set()):
        return [f"{rel} imports {name}"]
    if part == "protocol" and top not in sys.stdlib_module_names \
            and top not in PROTOCOL_THIRD_PARTY:
        return [f"{rel} imports {name}: the contract may import only "
                f"{', '.join(sorted(PROTOCOL_THIRD_PARTY))} and the standard library"]
    return []


def test_parts_respect_the_import_rules():
    violations = []
    checked = set()
    for part, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            checked.add(part)
            rel = path.relative_to(ROOT)
            for name in _imports(path):
                violations += _violations(part, rel, name)
    assert checked == set(ALLOWED), f"no sources found for {set(ALLOWED) - checked}"
    assert not violations, "\n".join(violations)


def test_tests_import_the_project_by_its_one_name():
    stale = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / "tests").rglob("*.py"))
             for name in _imports(path) if name.split(".")[0] in ALLOWED
             and name.split(".")[0] != "pdserve"]
    assert not stale, "\n".join(stale)


def test_the_rule_catches_what_it_forbids():
    assert _violations("router", Path("r.py"), "torch")
    assert _violations("router", Path("r.py"), "pdserve.engine.config")
    assert _violations("engine", Path("e.py"), "kvtransfer.base")
    assert _violations("protocol", Path("p.py"), "numpy")
    assert not _violations("protocol", Path("p.py"), "dataclasses")
    assert not _violations("decode_worker", Path("d.py"), "pdserve.worker.loop")


def test_router_protocol_and_client_load_without_torch_or_ray():
    code = ("import sys\n"
            "import pdserve.protocol, pdserve.rpc.client, pdserve.router.router, "
            "pdserve.router.server\n"
            "loaded = {'torch', 'ray', 'transformers'} & set(sys.modules)\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_proto_is_not_a_python_package():
    # `proto` would shadow the proto-plus package users may have installed.
    assert not (ROOT / "proto" / "__init__.py").exists()
