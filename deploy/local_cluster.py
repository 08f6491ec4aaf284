"""A whole pdserve cluster on this machine without Ray: Redis (embedded unless a URL is
given), each worker in its own process with its heartbeat, a supervisor over them, and the
router's gRPC server.

Life of a cluster:
1. `LocalCluster(spec)` starts Redis, the worker processes (concurrently, each with its
   heartbeat inside it), the supervisor (deploy.supervisor), then the router
   (deploy.router_thread), and returns once the gRPC server listens on `address` (and
   the HTTP server, given `http`).
2. A worker process that dies or whose engine loop breaks is ended and unregistered by the
   supervisor, and started again under the same id, as a new incarnation, within
   `restarts` (the default restarts nothing: the worker stays down). The router's
   `connect` then reaches the new process. `kill_worker(id)` kills a worker process as a
   crash would; `add_router()` starts another router on the same Redis.
3. `close()` stops the supervisor (a restart in progress finishes first), routers, workers
   (each unregisters itself) and Redis, in that order.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pdserve.deploy.handles import ThreadCalls, handle_for
from pdserve.deploy.heartbeat import HeartbeatConfig
from pdserve.deploy.local import WorkerProcess, build_worker
from pdserve.deploy.redis_server import RedisServer
from pdserve.deploy.router_thread import RoutedCluster, RouterThread
from pdserve.deploy.spec import ClusterSpec
from pdserve.deploy.supervisor import RestartPolicy, Supervisor
from pdserve.protocol import WorkerRecord
from pdserve.router.http import HttpConfig
from pdserve.router.registry import RegistryErrors, sync_client, unpublish
from pdserve.worker import Worker, WorkerConfig

log = logging.getLogger(__name__)
NO_RESTARTS = RestartPolicy(max_restarts=0)


class LocalCluster(RoutedCluster):
    def __init__(self, spec: ClusterSpec, redis_url: str | None = None,
                 address: str = "127.0.0.1:0", restarts: RestartPolicy = NO_RESTARTS,
                 build: Callable[[WorkerConfig], Worker] = build_worker,
                 http: HttpConfig | None = None):
        """`restarts`: how often a failed worker is started again; `build`: makes each
        worker in its process (deploy.local.WorkerProcess); `http`: the router's
        OpenAI-compatible HTTP server, None for none."""
        # workers' KV receivers bind loopback here; the router's stream, its stream_host
        self.spec = spec = spec.secured({"127.0.0.1", spec.router.stream_host})
        self._redis = None if redis_url else RedisServer()
        self.redis_url = redis_url or self._redis.url
        self._build = build
        self._stop_timeout_s = restarts.stop_timeout_s
        self._heartbeat = HeartbeatConfig(self.redis_url, socket.gethostname(),
                                          spec.block_size, spec.heartbeat_s,
                                          spec.heartbeat_ttl_s)
        self._placed: dict[str, tuple[WorkerConfig, tuple[int, ...] | None]] = {}
        self.procs: dict[str, WorkerProcess] = {}
        self.routers: list[RouterThread] = []
        self.supervisor: Supervisor | None = None
        try:
            self._start_workers()
            self.supervisor = Supervisor(self, self._placed, restarts)
            self.add_router(address, http)
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        roles = self.spec.roles()
        cores = sorted(os.sched_getaffinity(0))
        for i, (worker_id, role) in enumerate(roles):
            cpus = (cores[i % len(cores)],) if self.spec.pin_cores else None
            self._placed[worker_id] = (self.spec.worker_config(worker_id, role), cpus)
        with ThreadPoolExecutor(max(1, len(roles))) as pool:
            for f in [pool.submit(self.start, worker_id) for worker_id, _ in roles]:
                f.result()

    # -- deploy.supervisor.Members -----------------------------------------------------------

    def process(self, worker_id: str) -> WorkerProcess:
        return self.procs[worker_id]

    def start(self, worker_id: str) -> None:
        config, cpus = self._placed[worker_id]
        self.procs[worker_id] = WorkerProcess(
            config, cpus=cpus, num_threads=self.spec.threads_per_worker,
            heartbeat=self._heartbeat, build=self._build)

    def end(self, worker_id: str) -> None:
        proc = self.procs.get(worker_id)
        if proc is None:
            return
        proc.stop(self._stop_timeout_s)  # a live one unregisters itself
        # a dead one could not: routers would list it until its entry expires
        client = sync_client(self.redis_url)
        try:
            unpublish(client, worker_id)
        except RegistryErrors as e:
            log.warning("could not unregister %s (its entry expires): %s", worker_id, e)
        finally:
            client.close()

    # ------------------------------------------------------------------------------------------

    def connect(self, record: WorkerRecord):
        proc = self.procs.get(record.worker_id)
        if proc is None:
            raise ValueError(f"worker {record.worker_id} is not part of this cluster")
        # A restarted worker registers from its process before the supervisor holds that
        # process: a handle made then would reach the old one. The view tries again.
        if record.started != proc.started:
            raise ValueError(f"worker {record.worker_id}: the process of the incarnation "
                             f"started at {record.started:.3f} is not running here (yet)")
        calls = ThreadCalls(self.spec.worker_call_timeout_s, name=record.worker_id)
        calls.warm(proc.worker.load)
        return handle_for(record, proc.worker, calls)

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL, as a crash: nothing is unregistered, the heartbeat simply stops (the
        supervisor then ends it, and restarts it if its policy allows)."""
        self.procs[worker_id].kill()

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()
        self._close_routers()
        # popped one by one: a supervisor's watcher left behind may still end a worker
        while self.procs:
            self.procs.popitem()[1].stop()
        if self._redis is not None:
            self._redis.stop()
