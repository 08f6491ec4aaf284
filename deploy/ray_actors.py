"""Workers as Ray actors, and how the router's handles call them.

An actor's process is the worker's process: `WorkerHost` builds the worker (loading the
model) and its registry heartbeat there, on the node Ray placed it. Calls are explicit
delegating methods; the actor is threaded (`max_concurrency`) because the workers' methods
are thread-safe and a prefill call waits for its job.

Restarts: actors are created with `max_restarts`; a restarted actor builds a fresh worker
(new KV endpoint, empty cache) and registers a new incarnation under the same id, which
routers treat as the old worker gone and a new one come.
"""

from __future__ import annotations

import os
from dataclasses import replace

import ray
from pdserve.deploy.heartbeat import Heartbeat, WorkerIdentity
from pdserve.deploy.local import Role, build_worker
from pdserve.deploy.local_cluster import ClusterSpec
from ray.exceptions import RayActorError

NAMESPACE = "pdserve"


class WorkerHost:
    def __init__(self, spec: ClusterSpec, worker_id: str, role: Role, redis_url: str):
        import torch

        torch.set_num_threads(spec.threads_per_worker)
        config = spec.worker_config(worker_id, role)  # resolves (converts) the model here
        if role is not Role.PREFILL:  # advertise an address other nodes can reach
            config = replace(config, kv_host=ray.util.get_node_ip_address())
        self.role = role
        self.worker = build_worker(role, config)
        endpoint = self.worker.kv_endpoint() if role is Role.DECODE else ""
        self.heartbeat = Heartbeat(
            redis_url, self.worker,
            WorkerIdentity(worker_id, role.value, ray.get_runtime_context().get_node_id(),
                           endpoint, spec.block_size), spec.heartbeat_s, spec.heartbeat_ttl_s)

    def ready(self) -> tuple[str, int]:
        """(Ray node id, process id) once the worker is up."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def prefill(self, job):
        return self.worker.prefill(job)

    def reserve(self, job) -> str:
        return self.worker.reserve(job)

    def generate(self, job) -> None:
        self.worker.generate(job)

    def abort(self, transfer_id: str) -> None:
        self.worker.abort(transfer_id)

    def load(self):
        return self.worker.load()

    def close(self) -> None:
        self.heartbeat.stop()
        self.worker.close()


WorkerActor = ray.remote(WorkerHost)


class RayCalls:
    """Calls an actor's method remotely (for deploy.handles.DecodeHandle/PrefillHandle)."""

    gone: tuple[type[BaseException], ...] = (RayActorError,)

    async def __call__(self, method, arg):
        return await method.remote(arg)
