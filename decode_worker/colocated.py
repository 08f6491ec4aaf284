"""The colocated worker: prefill and decode in one engine (mixed mode, chunked prefill), the
baseline every benchmark compares with. The same job table and token stream as the decode
worker, without a KV receiver: every job is a local one (decode_worker/worker.py)."""

from __future__ import annotations

from pdserve.decode_worker.worker import DecodeWorker, colocated_jobs
from pdserve.protocol import WorkerRole
from pdserve.worker.base import Worker
from pdserve.worker.config import WorkerConfig


class ColocatedWorker(Worker):
    role = WorkerRole.COLOCATED

    def __init__(self, config: WorkerConfig):
        super().__init__(config, {WorkerRole.COLOCATED: colocated_jobs})

    generate = DecodeWorker.generate  # every job is local
