"""A whole pdserve cluster on this machine without Ray: Redis (embedded unless a URL is
given), each worker in its own process with its heartbeat, and the router's gRPC server.

Life of a cluster:
1. `LocalCluster(spec)` starts Redis, the worker processes (concurrently, each with its
   heartbeat inside it), then the router (deploy.router_thread), and returns once the
   gRPC server listens on `address`.
2. `kill_worker(id)` kills a worker process as a crash would (its heartbeat then stops
   and its registry entry expires); `add_router()` starts another router on the same Redis.
3. `close()` stops routers, workers (each unregisters itself) and Redis, in that order.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

from pdserve.deploy.handles import handle_for
from pdserve.deploy.heartbeat import HeartbeatConfig
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
            heartbeat = HeartbeatConfig(self.redis_url, node, self.spec.block_size,
                                        self.spec.heartbeat_s, self.spec.heartbeat_ttl_s)
            self.procs[worker_id] = WorkerProcess(
                self.spec.worker_config(worker_id, role), cpus=cpus,
                num_threads=self.spec.threads_per_worker, heartbeat=heartbeat)

        with ThreadPoolExecutor(max(1, len(roles))) as pool:
            for f in [pool.submit(start, i, wid, role) for i, (wid, role) in enumerate(roles)]:
                f.result()

    def connect(self, record: WorkerRecord):
        proc = self.procs.get(record.worker_id)
        if proc is None:
            raise ValueError(f"worker {record.worker_id} is not part of this cluster")
        return handle_for(record, proc.worker)

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL, as a crash: nothing is unregistered, the heartbeat simply stops."""
        self.procs[worker_id].kill()

    def close(self) -> None:
        self._close_routers()
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()
        if self._redis is not None:
            self._redis.stop()
