"""A whole pdserve cluster on this machine without Ray: Redis (embedded unless a URL is
given), each worker in its own process with its heartbeat, and the router's gRPC server.

Life of a cluster:
1. `LocalCluster(spec)` starts Redis, the worker processes (concurrently), their
   heartbeats, then the router (`RouterThread`: its own thread and asyncio loop), and
   returns once the gRPC server listens on `address`.
2. `kill_worker(id)` kills a worker process as a crash would (its heartbeat then stops
   and its registry entry expires); `add_router()` starts another router on the same Redis.
3. `close()` stops routers, heartbeats (unregistering), workers and Redis, in that order.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import redis.asyncio
from pdserve.decode_worker import DecodeWorkerConfig
from pdserve.deploy.handles import DecodeHandle, PrefillHandle
from pdserve.deploy.heartbeat import Heartbeat, WorkerIdentity
from pdserve.deploy.local import Role, WorkerProcess
from pdserve.deploy.redis_server import RedisServer
from pdserve.engine import (
    CacheConfig,
    EngineConfig,
    EngineMode,
    ModelConfig,
    SchedulerConfig,
    resolve_model,
)
from pdserve.engine.config import default_device
from pdserve.kvtransfer.transports import TransportKind
from pdserve.prefill_worker import PrefillWorkerConfig
from pdserve.router.registry import WorkerRecord
from pdserve.router.router import Router, RouterConfig
from pdserve.router.server import start_server
from pdserve.router.tokenizer import RouterTokenizer

_MODES = {Role.PREFILL: EngineMode.PREFILL_ONLY, Role.DECODE: EngineMode.DECODE_ONLY,
          Role.COLOCATED: EngineMode.MIXED}


@dataclass(frozen=True)
class ClusterSpec:
    model: str = "smollm2-135m"
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    block_size: int = 16
    num_blocks: int = 512
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    transport: TransportKind = TransportKind.ZMQ
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0  # Ray only: GPUs each worker actor asks for
    pin_cores: bool = False  # one core per worker, round robin over this process's cores
    heartbeat_s: float = 0.5
    heartbeat_ttl_s: float = 3.0
    router: RouterConfig = field(default_factory=RouterConfig)

    def roles(self) -> list[tuple[str, Role]]:
        return ([(f"prefill-{i}", Role.PREFILL) for i in range(self.prefill)]
                + [(f"decode-{i}", Role.DECODE) for i in range(self.decode)]
                + [(f"colocated-{i}", Role.COLOCATED) for i in range(self.colocated)])

    def worker_config(self, worker_id: str, role: Role):
        engine = EngineConfig(
            model=ModelConfig.from_pretrained(resolve_model(self.model)),
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks),
            scheduler=SchedulerConfig(mode=_MODES[role],
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_num_seqs=self.max_num_seqs),
            device=default_device())  # evaluated where the worker runs
        if role is Role.PREFILL:
            return PrefillWorkerConfig(engine, self.transport, worker_id=worker_id)
        return DecodeWorkerConfig(engine, self.transport, worker_id=worker_id)


class RouterThread:
    """A Router and its gRPC server on their own asyncio loop in a thread."""

    def __init__(self, config: RouterConfig, model_dir, redis_url: str, connect,
                 address: str = "127.0.0.1:0"):
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._args = (config, model_dir, redis_url, connect, address)
        self._thread = threading.Thread(target=self._run, name=config.router_id, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"router failed to start: {self._error}") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001 - reported by the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        config, model_dir, redis_url, connect, address = self._args
        self._redis = redis.asyncio.Redis.from_url(redis_url)
        self.router = Router(config, RouterTokenizer(model_dir), self._redis, connect)
        await self.router.start()
        self._server, self.port = await start_server(self.router, address)
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def call(self, coro):
        """Run a coroutine on the router's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        async def stop():
            await self._server.stop(grace=1.0)
            await self.router.close()
            await self._redis.aclose()

        if self._loop.is_running():
            self.call(stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def start_router(spec: ClusterSpec, redis_url: str, connect, index: int,
                 address: str) -> RouterThread:
    """The cluster's `index`-th router (id `router-<index>`) and its gRPC server."""
    config = replace(spec.router, router_id=f"router-{index}")
    return RouterThread(config, resolve_model(spec.model), redis_url, connect, address)


class LocalCluster:
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

    @property
    def address(self) -> str:
        return self.routers[0].address

    def _start_workers(self) -> None:
        roles = self.spec.roles()
        cores = sorted(os.sched_getaffinity(0))
        node = socket.gethostname()

        def start(i: int, worker_id: str, role: Role):
            cpus = (cores[i % len(cores)],) if self.spec.pin_cores else None
            proc = WorkerProcess(role, self.spec.worker_config(worker_id, role), cpus=cpus,
                                 num_threads=self.spec.threads_per_worker)
            self.procs[worker_id] = proc
            endpoint = proc.worker.kv_endpoint() if role is Role.DECODE else ""
            self.heartbeats[worker_id] = Heartbeat(
                self.redis_url, proc.worker,
                WorkerIdentity(worker_id, role.value, node, endpoint, self.spec.block_size),
                self.spec.heartbeat_s, self.spec.heartbeat_ttl_s)

        with ThreadPoolExecutor(max(1, len(roles))) as pool:
            for f in [pool.submit(start, i, wid, role) for i, (wid, role) in enumerate(roles)]:
                f.result()

    def connect(self, record: WorkerRecord):
        proc = self.procs.get(record.worker_id)
        if proc is None:
            raise ValueError(f"worker {record.worker_id} is not part of this cluster")
        handle = PrefillHandle if record.role == Role.PREFILL.value else DecodeHandle
        return handle(proc.worker, record.worker_id)

    def add_router(self, address: str = "127.0.0.1:0") -> RouterThread:
        router = start_router(self.spec, self.redis_url, self.connect, len(self.routers),
                              address)
        self.routers.append(router)
        return router

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL, as a crash: nothing is unregistered, the heartbeat simply stops."""
        self.procs[worker_id].kill()

    def close(self) -> None:
        for router in self.routers:
            router.close()
        self.routers.clear()
        for hb in self.heartbeats.values():
            hb.stop()
        self.heartbeats.clear()
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()
        if self._redis is not None:
            self._redis.stop()
