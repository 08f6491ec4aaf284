"""A worker's presence in the registry: every `interval_s` its load (and the blocks that
entered or left its prefix cache) go to Redis with a TTL of `ttl_s`.

It runs in the worker's own process (a Ray actor, or a `deploy.local` child), so the beat
says that the worker is alive, never that some other process (a busy router) was on time.

Life of a heartbeat:
1. STARTING  `Heartbeat(...)` publishes once, so a worker is registered before it is
             announced as up, then starts its thread. A broken worker raises; a Redis that
             does not answer (a worker restarted during an outage) does not: the thread
             registers it once Redis is back (FAILING).
2. BEATING   each beat drains the worker's prefix-cache deltas into `cached` (the set of
             every block hash its cache holds), then publishes the record and the deltas.
3. FAILING   a beat failed (Redis gone, hung or restarting; or the worker broken): the
             thread keeps trying, its period doubling up to `max_backoff_s`, and says so
             once per outage. A worker that cannot beat is not published, so its entry
             expires: that is how routers learn a worker died.
4. RESYNCED  the first beat that lands after a failure, or that finds no entry of its own
             in the registry (a new, empty redis-server; an expired entry), re-publishes
             every block of `cached`, not only the deltas: the index it fed may be gone.
             Then BEATING again.
5. STOPPED   `stop()` ends the thread and removes the entry at once (an orderly shutdown).

An adaptive worker's beat also carries its role as it stands now (role, state, KV
endpoint: worker.switch), and then reads the role the cluster's controller wants it in
(router.controller.store): one that differs from the role it serves, or drains toward,
is passed to `switch_role`. Targets are fenced by the controller's epoch: one older than
a target this heartbeat has followed is ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.protocol import WorkerRecord, WorkerRole, WorkerState
from pdserve.router.controller.store import read_target
from pdserve.router.registry import (
    RegistryErrors,
    index_prefixes,
    publish,
    sync_client,
    unpublish,
)

if TYPE_CHECKING:
    from pdserve.worker.switch import RoleStatus

log = logging.getLogger(__name__)
MAX_PENDING_REMOVALS = 1 << 16


class WorkerBroken(RuntimeError):
    """The worker's engine loop stopped; it is not published while it stays so."""


@dataclass(frozen=True)
class HeartbeatConfig:
    """Where and how often a worker beats; picklable, so a parent can hand it to the
    process the worker runs in."""

    redis_url: str = field(repr=False)  # may hold the password
    node: str
    block_size: int
    interval_s: float = 0.5
    ttl_s: float = 3.0

    @property
    def max_backoff_s(self) -> float:
        # A worker is back in the registry soon after Redis is: within the TTL, and well
        # within the grace a router's view gives workers to re-register (router.view).
        return max(self.interval_s, min(self.ttl_s / 2, 2.0))


class Heartbeat:
    """`worker` is a worker object or a proxy to one (deploy.local): it offers `load()`,
    `kv_endpoint()` and `drain_prefix_events()`, and this heartbeat is the only caller of
    the last."""

    def __init__(self, config: HeartbeatConfig, worker, worker_id: str, role: WorkerRole,
                 adaptive: bool = False):
        """`role`: the worker's; with `adaptive`, the one it starts in (the worker then
        also offers `role_status()` and `switch_role(role)`)."""
        self.config = config
        self.worker_id, self.role, self.adaptive = worker_id, role, adaptive
        self.epoch = 0  # of the latest controller target followed
        self._worker = worker
        self._kv_endpoint = worker.kv_endpoint()
        self._client = sync_client(config.redis_url)
        self._stop = threading.Event()
        self._started = time.time()
        self.cached: set[int] = set()  # every block hash the worker's prefix cache holds
        # deltas drained but not yet in the index (a beat failed after draining them)
        self._added: set[int] = set()
        self._removed: set[int] = set()
        self._resync = False
        self.failures = 0  # consecutive failed beats
        try:
            self.beat()  # registered before anyone is told the worker is up
        except RegistryErrors as e:
            self.failures = 1
            log.warning("%s is not registered yet, retrying every <= %.1f s: %s", worker_id,
                        config.max_backoff_s, e)
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{worker_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def started(self) -> float:
        """When this incarnation of the worker started: its registry record's `started`."""
        return self._started

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def beat(self) -> None:
        """Publish the worker's record and its prefix blocks once; raises WorkerBroken or
        one of `RegistryErrors`, and then the next beat re-publishes everything."""
        load = self._worker.load()
        if load.error:
            raise WorkerBroken(f"worker {self.worker_id} is broken: {load.error}")
        # Drained before publishing: a delta drained by a beat that then fails is kept here
        # for the next one, never lost.
        entered, left = self._worker.drain_prefix_events()
        self.cached.difference_update(left)
        self.cached.update(entered)
        self._added.difference_update(left)
        self._added.update(entered)
        self._removed.difference_update(entered)
        self._removed.update(left)
        if len(self._removed) > MAX_PENDING_REMOVALS:
            # a long outage under load: a surviving index may keep some stale entries,
            # which only bias routing, rather than this set growing without bound
            self._removed.clear()
        e = load.engine
        role = self._worker.role_status() if self.adaptive else None
        try:
            fresh = publish(self._client, WorkerRecord(
                self.worker_id, role.role if role else self.role, self.config.node,
                role.kv_endpoint if role else self._kv_endpoint,
                self.config.block_size, e.num_total_blocks, e.num_free_blocks, e.num_running,
                e.num_waiting, e.num_queued_prefill_tokens, time.time(), self._started,
                load.prefill_tokens_per_s, load.num_leases, load.decode_step_s,
                e.num_prefix_query_tokens, e.num_prefix_hit_tokens, load.chunk_tokens,
                role.state if role else WorkerState.SERVING, self.adaptive,
                role.since if role else self._started, load.prefill_stall_s),
                self.config.ttl_s)
            if fresh or self._resync:
                index_prefixes(self._client, self.worker_id, self.cached, self._removed)
            elif self._added or self._removed:
                index_prefixes(self._client, self.worker_id, self._added, self._removed)
        except RegistryErrors:
            self._resync = True
            raise
        self._resync = False
        self._added.clear()
        self._removed.clear()
        if role is not None:
            self._follow(role)

    def _follow(self, status: RoleStatus) -> None:
        """Pass the controller's target for this worker on, if it is new to it."""
        target = read_target(self._client, self.worker_id)
        if target is None or target.epoch < self.epoch:
            return
        self.epoch = target.epoch
        if target.role is not (status.target or status.role):
            log.warning("worker %s: the controller (epoch %d) moves it %s -> %s: %s",
                        self.worker_id, target.epoch, status.role.value, target.role.value,
                        target.reason)
            self._worker.switch_role(target.role)

    def stop(self, unregister: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if unregister:
            try:
                unpublish(self._client, self.worker_id)
            except RegistryErrors as e:
                log.warning("could not unregister %s: %s", self.worker_id, e)
        self._client.close()

    def _run(self) -> None:
        delay = self.config.interval_s
        while not self._stop.wait(delay):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - silence is the signal: the entry expires
                self.failures += 1
                if self.failures == 1:
                    log.warning("heartbeat of %s failed, retrying every <= %.1f s: %s",
                                self.worker_id, self.config.max_backoff_s, e)
                delay = min(2 * delay, self.config.max_backoff_s)
                continue
            if self.failures:
                log.warning("heartbeat of %s landed again after %d failed beats",
                            self.worker_id, self.failures)
            self.failures = 0
            delay = self.config.interval_s
