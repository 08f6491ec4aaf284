"""Worker configs and worker processes for the worker tests (real processes, loopback)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.decode_worker import DecodeWorkerConfig
from pdserve.deploy.local import Role, WorkerProcess
from pdserve.engine import CacheConfig, EngineConfig, EngineMode, ModelConfig, SchedulerConfig
from pdserve.prefill_worker import PrefillWorkerConfig

_MODES = {Role.PREFILL: EngineMode.PREFILL_ONLY, Role.DECODE: EngineMode.DECODE_ONLY,
          Role.COLOCATED: EngineMode.MIXED}


def worker_config(role: Role, model_dir: Path, worker_id: str, *, block_size: int = 4,
                  num_blocks: int = 512, max_num_batched_tokens: int = 64,
                  max_num_seqs: int = 64, ack_timeout_s: float = 5.0):
    engine = EngineConfig(
        model=ModelConfig.from_pretrained(model_dir),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(mode=_MODES[role], max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs),
        device="cpu",
    )
    if role is Role.PREFILL:
        return PrefillWorkerConfig(engine, ack_timeout_s=ack_timeout_s, handshake_timeout_s=3.0,
                                   worker_id=worker_id)
    return DecodeWorkerConfig(engine, worker_id=worker_id)


def spawn(specs: list[tuple[Role, object]]) -> list[WorkerProcess]:
    """Start one process per (role, config), concurrently; one torch thread each."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(WorkerProcess, role, config, cpus=None, num_threads=1)
                   for role, config in specs]
        return [f.result() for f in futures]


def stop_all(procs: list[WorkerProcess]) -> None:
    for p in procs:
        p.stop()
