"""Workers whose engine loop a test can break from another process: `abort(BREAK)` posts
an exception onto the loop, which ends it as a fault outside any one request would
(`load().error` then says why). Pass `build` to deploy.local.WorkerProcess or LocalCluster;
the child process imports it by name from this module."""

from __future__ import annotations

from pdserve.decode_worker import ColocatedWorker, DecodeWorker
from pdserve.prefill_worker import PrefillWorker
from pdserve.protocol import WorkerRole
from pdserve.worker import Worker, WorkerConfig

BREAK = "test:break-the-engine-loop"


class InjectedLoopFault(RuntimeError):
    pass


def _raise() -> None:
    raise InjectedLoopFault("injected: the engine loop breaks")


def _breakable(cls: type[Worker]) -> type[Worker]:
    class Breakable(cls):
        def abort(self, transfer_id: str) -> None:
            if transfer_id == BREAK:
                self._loop.post(_raise)
            else:
                super().abort(transfer_id)

    Breakable.__name__ = Breakable.__qualname__ = f"Breakable{cls.__name__}"
    return Breakable


_CLASSES = {WorkerRole.PREFILL: _breakable(PrefillWorker),
            WorkerRole.DECODE: _breakable(DecodeWorker),
            WorkerRole.COLOCATED: _breakable(ColocatedWorker)}


def build(config: WorkerConfig) -> Worker:
    return _CLASSES[config.role](config)
