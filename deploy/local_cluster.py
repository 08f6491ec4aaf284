"""A whole pdserve cluster on this machine without Ray: Redis (embedded unless a URL is
given), each worker in its own process with its heartbeat, and the router's gRPC server.

Life of a cluster:
1. `LocalCluster(spec)` starts Redis, the worker processes (concurrently), their
   heartbeats, then the router (deploy.router_thread), and returns once the gRPC server
   listens on `address`.
2. `kill_worker(id)` kills a worker process as a crash would (its heartbeat then stops
   and its registry entry expires); `add_router()` starts another router on the same Redis.
3. `close()` stops routers, heartbeats (unregistering), workers and Redis, in that order.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

from pdserve.deploy.handles import ThreadCalls, handle_for
from pdserve.deploy.heartbeat import Heartbeat
from pdserve.deploy.local import WorkerProcess
from pdserve.deploy.redis_server import RedisServer
from pdserve.deploy.router_thread import RoutedCluster, RouterThread
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import WorkerRecord, WorkerRole


class LocalCluster(RoutedCluster):
    def __init__(self, spec: ClusterSpec, redis_url: str | None = None,
                 address: str = "127.0.0.1:0"):
        self.spec = spec
        self._redis = None if redis_url else RedisServer()
        self.redis_url = redis_url or self._redis.url
        self.procs: dict[str, WorkerProcess] = {}
        self.heartbeats: dict[str, Heartbeat] = {}
        self.routers: list[RouterThread] = []
        try:
            self._start_workers()
            self.add_router(address)
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        roles = self.spec.roles()
        cores = sorted(os.sched_getaffinity(0))
        node = socket.gethostname()

        def start(i: int, worker_id: str, role: WorkerRole):
            cpus = (cores[i % len(cores)],) if self.spec.pin_cores else None
            proc = WorkerProcess(self.spec.worker_config(worker_id, role), cpus=cpus,
                                 num_threads=self.spec.threads_per_worker)
            self.procs[worker_id] = proc
            self.heartbeats[worker_id] = Heartbeat(
                self.redis_url, proc.worker, worker_id, role, node, self.spec.block_size,
                self.spec.heartbeat_s, self.spec.heartbeat_ttl_s)

        with ThreadPoolExecutor(max(1, len(roles))) as pool:
            for f in [pool.submit(start, i, wid, role) for i, (wid, role) in enumerate(roles)]:
                f.result()

    def connect(self, record: WorkerRecord):
        proc = self.procs.get(record.worker_id)
        if proc is None:
            raise ValueError(f"worker {record.worker_id} is not part of this cluster")
        return handle_for(record, proc.worker,
                          ThreadCalls(self.spec.worker_call_timeout_s, name=record.worker_id))

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL, as a crash: nothing is unregistered, the heartbeat simply stops."""
        self.procs[worker_id].kill()

    def close(self) -> None:
        self._close_routers()
        for hb in self.heartbeats.values():
            hb.stop()
        self.heartbeats.clear()
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()
        if self._redis is not None:
            self._redis.stop()
