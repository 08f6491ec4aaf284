"""A worker's presence in the registry: every `interval_s` its load (and the blocks that
entered or left its prefix cache) go to Redis with a TTL of `ttl_s`.

A worker that stops answering stops being published, and its entry expires: that is how
routers learn it died. `stop()` removes the entry at once (an orderly shutdown).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from pdserve.router.registry import WorkerRecord, index_prefixes, publish, unpublish

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    node: str
    kv_endpoint: str
    block_size: int


class Heartbeat:
    def __init__(self, redis_url: str, worker, identity: WorkerIdentity,
                 interval_s: float = 0.5, ttl_s: float = 3.0):
        self.identity = identity
        self._worker = worker
        self._client = redis.Redis.from_url(redis_url)
        self._interval = interval_s
        self._ttl = ttl_s
        self._stop = threading.Event()
        self._started = time.time()
        self.beat()  # registered before anyone is told the worker is up
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{identity.worker_id}",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> None:
        load = self._worker.load()
        if load.error:
            raise RuntimeError(f"worker {self.identity.worker_id} is broken: {load.error}")
        e, ident = load.engine, self.identity
        publish(self._client, WorkerRecord(
            ident.worker_id, ident.role, ident.node, ident.kv_endpoint, ident.block_size,
            e.num_total_blocks, e.num_free_blocks, e.num_running, e.num_waiting,
            e.num_queued_prefill_tokens, time.time(), self._started), self._ttl)
        added, removed = self._worker.drain_prefix_events()
        if added or removed:
            index_prefixes(self._client, ident.worker_id, added, removed)

    def stop(self, unregister: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if unregister:
            try:
                unpublish(self._client, self.identity.worker_id)
            except redis.RedisError as e:
                log.warning("could not unregister %s: %s", self.identity.worker_id, e)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - silence is the signal: the entry expires
                log.warning("heartbeat of %s stopped: %s", self.identity.worker_id, e)
                return
