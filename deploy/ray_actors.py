"""Workers as Ray actors, and how the router's handles call them.

An actor's process is the worker's process: `WorkerHost` builds the worker (loading the
model and warming it up) and then its registry heartbeat there, on the node Ray placed it,
so a worker is routable only once warm. Calls are explicit
delegating methods; the actor is threaded (`max_concurrency`) because the workers' methods
are thread-safe (and none waits for a step or a job).

Restarts: actors are created with `max_restarts`; a restarted actor builds a fresh worker
(new KV endpoint, empty cache) and registers a new incarnation under the same id, which
routers treat as the old worker gone and a new one come. A worker whose engine loop broke
(which never recovers) ends its actor's process (`exit_when_broken`), so Ray restarts it
as it would after a crash, rather than leaving a worker that only refuses work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

from pdserve.deploy.handles import DEFAULT_CALL_TIMEOUT_S, CallTimeout
from pdserve.deploy.heartbeat import Heartbeat, HeartbeatConfig
from pdserve.deploy.local import build_worker
from pdserve.deploy.logs import configure_logging
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import DecodeOrder, PrefillOrder, Reservation, WorkerRole

NAMESPACE = "pdserve"
log = logging.getLogger(__name__)


def exit_when_broken(worker, stop: threading.Event, period_s: float,
                     exit: Callable[[int], object] = os._exit) -> None:
    """Ask `worker.load()` every `period_s` until `stop` is set; once its engine loop broke,
    `exit(1)`: the process ends as in a crash (os._exit: no cleanup that could hang)."""
    while not stop.wait(period_s):
        error = worker.load().error
        if error:
            log.critical("worker %s: engine loop broke (%s); ending the actor's process so "
                         "Ray restarts it", worker.worker_id, error)
            exit(1)
            return


class WorkerHost:
    def __init__(self, spec: ClusterSpec, worker_id: str, role: WorkerRole, redis_url: str):
        import torch

        configure_logging()
        torch.set_num_threads(spec.threads_per_worker)
        # resolves (converts) the model here; KV is received at an address other nodes reach
        config = spec.worker_config(worker_id, role, kv_host=ray.util.get_node_ip_address())
        self.worker = build_worker(config)
        self.heartbeat = Heartbeat(
            HeartbeatConfig(redis_url, ray.get_runtime_context().get_node_id(),
                            spec.block_size, spec.heartbeat_s, spec.heartbeat_ttl_s),
            self.worker, worker_id, role, config.adaptive)
        self._closing = threading.Event()
        threading.Thread(target=exit_when_broken,
                         args=(self.worker, self._closing, spec.heartbeat_s),
                         name=f"watch-{worker_id}", daemon=True).start()

    def ready(self) -> tuple[str, int]:
        """(Ray node id, process id) once the worker is up."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def submit(self, order: PrefillOrder) -> bool:
        return self.worker.submit(order)

    def reserve(self, order: DecodeOrder) -> Reservation:
        return self.worker.reserve(order)

    def generate(self, order: DecodeOrder) -> None:
        self.worker.generate(order)

    def abort(self, transfer_id: str) -> None:
        self.worker.abort(transfer_id)

    def load(self):
        return self.worker.load()

    def close(self) -> None:
        self._closing.set()
        self.heartbeat.stop()
        self.worker.close()


WorkerActor = ray.remote(WorkerHost)


class RayCalls:
    """Calls an actor's method remotely (for deploy.handles.WorkerHandle), waiting at most
    `timeout_s` for the answer (CallTimeout; deploy.handles, Timeouts). The actor call is
    submitted either way: a timed-out one may still run when the actor answers again, so
    `withdraw` changes nothing here (an abort always reaches the actor)."""

    gone: tuple[type[BaseException], ...] = (RayActorError,)

    def __init__(self, timeout_s: float = DEFAULT_CALL_TIMEOUT_S):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s

    async def __call__(self, method, arg, withdraw: bool = True):
        try:
            return await asyncio.wait_for(method.remote(arg), self.timeout_s)
        except TimeoutError:
            raise CallTimeout(f"no answer within {self.timeout_s:g}s") from None
