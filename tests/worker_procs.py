"""Worker configs and worker processes for the worker tests (real processes, loopback)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.deploy.local import WorkerProcess
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import WorkerRole
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


def spawn(configs: list[WorkerConfig]) -> list[WorkerProcess]:
    """Start one process per config, concurrently; one torch thread each."""
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = [pool.submit(WorkerProcess, config, cpus=None, num_threads=1)
                   for config in configs]
        return [f.result() for f in futures]


def stop_all(procs: list[WorkerProcess]) -> None:
    for p in procs:
        p.stop()
