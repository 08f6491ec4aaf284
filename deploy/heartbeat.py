"""A worker's presence in the registry: every `interval_s` its load (and the blocks that
entered or left its prefix cache) go to Redis with a TTL of `ttl_s`.

A worker that stops answering stops being published, and its entry expires: that is how
routers learn it died. `stop()` removes the entry at once (an orderly shutdown).
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.registry import index_prefixes, publish, unpublish

log = logging.getLogger(__name__)


class Heartbeat:
    """`worker` is a worker object or a proxy to one (deploy.local)."""

    def __init__(self, redis_url: str, worker, worker_id: str, role: WorkerRole, node: str,
                 block_size: int, interval_s: float = 0.5, ttl_s: float = 3.0):
        self.worker_id, self.role, self.node, self.block_size = worker_id, role, node, block_size
        self._worker = worker
        self._kv_endpoint = worker.kv_endpoint()
        self._client = redis.Redis.from_url(redis_url)
        self._interval = interval_s
        self._ttl = ttl_s
        self._stop = threading.Event()
        self._started = time.time()
        self.beat()  # registered before anyone is told the worker is up
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{worker_id}",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> None:
        load = self._worker.load()
        if load.error:
            raise RuntimeError(f"worker {self.worker_id} is broken: {load.error}")
        e = load.engine
        publish(self._client, WorkerRecord(
            self.worker_id, self.role, self.node, self._kv_endpoint, self.block_size,
            e.num_total_blocks, e.num_free_blocks, e.num_running, e.num_waiting,
            e.num_queued_prefill_tokens, time.time(), self._started,
            load.prefill_tokens_per_s), self._ttl)
        added, removed = self._worker.drain_prefix_events()
        if added or removed:
            index_prefixes(self._client, self.worker_id, added, removed)

    def stop(self, unregister: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if unregister:
            try:
                unpublish(self._client, self.worker_id)
            except redis.RedisError as e:
                log.warning("could not unregister %s: %s", self.worker_id, e)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - silence is the signal: the entry expires
                log.warning("heartbeat of %s stopped: %s", self.worker_id, e)
                return
