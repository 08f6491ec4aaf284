"""A worker that may serve as prefill, decode or colocated, and changes role when the
cluster's controller says so (router.controller), by draining (worker.switch): one
process, one model load, one Engine for its whole life.

It offers every role's calls; those of a role it does not serve now (or any, while it
drains) raise NotServing, holding nothing, and the router sends the order elsewhere. A
call and a switch never interleave: the call checks the role and hands its order to the
engine loop under the switch's lock, so the order lands in the job table of the role
that accepted it.
"""

from __future__ import annotations

from pdserve.decode_worker.worker import DecodeWorker, colocated_jobs, decode_jobs
from pdserve.prefill_worker.worker import PrefillWorker, prefill_jobs
from pdserve.protocol import DecodeOrder, PrefillOrder, Reservation, WorkerRole
from pdserve.worker.base import Worker
from pdserve.worker.config import WorkerConfig

TABLES = {WorkerRole.PREFILL: prefill_jobs, WorkerRole.DECODE: decode_jobs,
          WorkerRole.COLOCATED: colocated_jobs}


class AdaptiveWorker(Worker):
    def __init__(self, config: WorkerConfig):
        if not config.adaptive:
            raise ValueError("an AdaptiveWorker needs an adaptive config")
        super().__init__(config, TABLES)

    @property
    def role(self) -> WorkerRole:
        return self._switch.status().role

    @property
    def _receiver(self):
        return self._jobs.receiver

    def kv_endpoint(self) -> str:
        return self._switch.status().kv_endpoint

    def submit(self, order: PrefillOrder) -> bool:
        """PrefillWorker.submit while it serves as prefill, else NotServing."""
        with self._switch.lock:
            self._switch.check(WorkerRole.PREFILL)
            return PrefillWorker.submit(self, order)

    def reserve(self, order: DecodeOrder) -> Reservation:
        """DecodeWorker.reserve while it serves as decode, else NotServing."""
        with self._switch.lock:
            self._switch.check(WorkerRole.DECODE)
            return DecodeWorker.reserve(self, order)

    def generate(self, order: DecodeOrder) -> None:
        """DecodeWorker.generate while it serves as decode or colocated, else NotServing."""
        with self._switch.lock:
            self._switch.check(WorkerRole.DECODE, WorkerRole.COLOCATED)
            DecodeWorker.generate(self, order)
