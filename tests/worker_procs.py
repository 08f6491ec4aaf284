"""Worker configs and worker processes for the worker tests (real processes, loopback)."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.deploy.local import WorkerProcess
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import WorkerRole
from pdserve.router.router import RouterConfig
from pdserve.worker import WorkerConfig


def worker_config(role: WorkerRole, model_dir: Path, worker_id: str, *, block_size: int = 4,
                  num_blocks: int = 512, max_num_batched_tokens: int = 64,
                  max_num_seqs: int = 64, ack_timeout_s: float = 5.0,
                  keepalive_s: float = 0.1, **spec) -> WorkerConfig:
    """A CPU worker on `model_dir`, configured the way `pdserve serve` configures one."""
    return ClusterSpec(model=str(model_dir), block_size=block_size, num_blocks=num_blocks,
                       max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                       device="cpu", handshake_timeout_s=3.0, ack_timeout_s=ack_timeout_s,
                       keepalive_s=keepalive_s,
                       **spec).worker_config(worker_id, role)


def slow_prefill_config(model_dir: Path, worker_id: str) -> WorkerConfig:
    """A prefill worker that computes one token per step, so a prompt streams for hundreds
    of steps (long enough to act while it does); a held KV waits 3 s for its re-send
    (hold_s follows the router's lease)."""
    return worker_config(WorkerRole.PREFILL, model_dir, worker_id, max_num_batched_tokens=1,
                         max_num_seqs=1, ack_timeout_s=5.0, router=RouterConfig(lease_s=3.0))


# what `spawn` started and `stop_all` has not stopped: (worker id, process) by id(process)
_RUNNING: dict[int, tuple[str, WorkerProcess]] = {}


def spawn(configs: list[WorkerConfig]) -> list[WorkerProcess]:
    """Start one process per config, concurrently; one torch thread each."""
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = [pool.submit(WorkerProcess, config, cpus=None, num_threads=1)
                   for config in configs]
        procs = [f.result() for f in futures]
    for config, proc in zip(configs, procs, strict=True):
        _RUNNING[id(proc)] = (config.worker_id, proc)
    return procs


def stop_all(procs: list[WorkerProcess]) -> None:
    for p in procs:
        _RUNNING.pop(id(p), None)
        p.stop()


def dead_workers() -> list[str]:
    """The spawned worker processes that exited before `stop_all`, with how: a failing
    test's report names them (conftest), since a worker's own output may be lost to the
    capture of the test that started it."""
    dead = []
    for worker_id, proc in list(_RUNNING.values()):
        if proc.is_alive():
            continue
        code = proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        dead.append(f"worker {worker_id} (pid {proc.pid}, {proc.role.value}): {how}")
    return dead
