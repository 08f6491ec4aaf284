"""The wheel, installed fresh as a client: built from a clean copy of the source tree
(nothing is written into the repository), installed with `--no-deps --no-index` into a new
virtual environment that borrows this interpreter's installed third-party packages except
the `server` extra's (torch, ray, ...) and its own pdserve (no editable finder, no
dist-info). There `pdserve --help` works, the gRPC client imports, the traces ship, a
server-side command names the extra to install; the wheel installs nothing but `pdserve`
and its dist-info, and its metadata keeps torch and ray in the `server` extra."""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a fresh clone would not have: build outputs, caches, environments, results
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ruff_cache", "results")


def _run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120, **kw)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "--disable-pip-version-check", ".", "-w", tmp / "dist"], cwd=source)
    (built,) = (tmp / "dist").glob("pdserve-*.whl")
    return built


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def _requires(wheel: Path) -> dict[str | None, set[str]]:
    """The wheel's Requires-Dist names by extra (None: no extra), lower case."""
    by_extra: dict[str | None, set[str]] = {}
    for req in _metadata(wheel).get_all("Requires-Dist"):
        dist = re.match(r"[A-Za-z0-9_.-]+", req).group().lower()
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        by_extra.setdefault(extra and extra.group(1), set()).add(dist)
    return by_extra


def _server_entries(wheel: Path) -> set[str]:
    """site-packages entries (packages, modules, dist-infos) of the `server` extra's
    distributions installed here."""
    entries = set()
    for dist in _requires(wheel)["server"]:
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        entries |= {f.parts[0] for f in files if f.parts[0] != ".."}
    return entries


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed as a client; its folder."""
    tmp = tmp_path_factory.mktemp("fresh")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    # this interpreter's packages, seen through links that leave out the server extra and
    # its own pdserve: the editable install's finder (__editable__*) and dist-info must not
    # reach the new venv
    deps = tmp / "deps"
    deps.mkdir()
    server = _server_entries(wheel)
    assert "torch" in server and "ray" in server
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.lower().startswith("pdserve") or "__editable__" in entry.name:
            continue
        if entry.name not in server:
            (deps / entry.name).symlink_to(entry)
    (_site_packages(venv) / "borrowed-deps.pth").write_text(f"{deps}\n")
    # this interpreter's pip, run as the new venv's python: nothing fetched, scripts in venv
    _run([sys.executable, "-m", "pip", "--python", _python(venv), "install", "--no-deps",
          "--no-index", "-q", "--disable-pip-version-check", wheel], cwd=tmp)
    return venv


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    (site,) = (venv / "lib").glob("python3*/site-packages")
    return site


def test_fresh_install_runs_the_cli_and_the_client_from_itself(fresh, tmp_path):
    out = _run([fresh / "bin" / "pdserve", "--help"], cwd=tmp_path).stdout
    assert "usage: pdserve" in out and "bench" in out
    probe = (
        "import contextlib, io, json, sys\n"
        "import pdserve, pdserve.rpc.client\n"
        "from pdserve.bench.workload import DEFAULT_TRACES_DIR, trace_dataset\n"
        "from pdserve.deploy.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(json.dumps({'pdserve': pdserve.__file__,\n"
        "                  'client': pdserve.rpc.client.__file__,\n"
        "                  'traces': str(DEFAULT_TRACES_DIR),\n"
        "                  'replayed': len(trace_dataset('mooncake', DEFAULT_TRACES_DIR, 3)),\n"
        "                  'heavy': [m for m in ('torch', 'ray') if m in sys.modules]}))\n")
    got = json.loads(_run([_python(fresh), "-c", probe], cwd=tmp_path).stdout)
    for key in ("pdserve", "client", "traces"):
        assert Path(got[key]).resolve().is_relative_to(fresh.resolve()), (key, got[key])
    assert got["replayed"] == 3 and got["heavy"] == []


def test_fresh_client_install_names_the_server_extra(fresh, tmp_path):
    r = subprocess.run([fresh / "bin" / "pdserve", "serve"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "torch" in r.stderr and "pip install 'pdserve[server]'" in r.stderr


def test_wheel_installs_only_pdserve_and_its_dist_info(fresh):
    (dist_info,) = _site_packages(fresh).glob("pdserve-*.dist-info")
    paths = [row.split(",")[0] for row in (dist_info / "RECORD").read_text().splitlines()]
    installed = [p for p in paths if p and not p.startswith("..")]  # scripts live in bin/
    assert {p.split("/")[0] for p in installed} == {"pdserve", dist_info.name}
    for data in ("pdserve/bench/traces/mooncake_synthetic.jsonl",
                 "pdserve/bench/traces/azure2023_conv.csv",
                 "pdserve/bench/traces/azure2023_code.csv",
                 "pdserve/bench/traces/README.md"):
        assert data in installed


def test_wheel_metadata_keeps_torch_and_ray_in_the_server_extra(wheel):
    by_extra = _requires(wheel)
    client = by_extra[None]
    assert {"grpcio", "protobuf"} <= client
    assert not client & {"torch", "ray"}
    assert {"torch", "ray", "transformers", "pyzmq", "redis"} <= by_extra["server"]
    assert not client & by_extra["server"]
    assert {"server", "gpu", "dev"} <= set(_metadata(wheel).get_all("Provides-Extra"))
