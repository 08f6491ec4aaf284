"""The router's view of the cluster: the live workers the Redis registry lists, a handle to
each, and which of this router's requests each one holds.

Life of a worker in the view:
1. JOINED   `refresh` finds its record in the registry and makes a handle (`connect`).
2. LISTED   each refresh updates its record (load, free blocks, role, state); requests put
            themselves in its `in_flight` while it holds their job, and take themselves out
            after. While its record says DRAINING (a role switch) it gets no new order.
3. DROPPED  its record expired or a new incarnation replaced it (`refresh`), or a call to it
            found it gone (`drop`): each request it held gets a `Gone` in its stream queue,
            so it fails with UNAVAILABLE instead of waiting for tokens that never come.
`changed` is notified whenever workers or slots change, so queued requests look again.

Liveness is the workers' word, never this router's clock: a record expires by its TTL in
Redis, measured from the worker's last heartbeat there, so a router whose loop stalled for
seconds finds the same records when it reads again and drops no one.

Life of the registry as the view sees it:
1. READABLE    each refresh takes the registry's view, as above.
2. UNREACHABLE a read fails (Redis dead, hung or restarting): the view keeps its last
               workers and records, routing goes on with them (prefix hits are then empty),
               and the outage is logged once. A worker that dies meanwhile is found by its
               calls failing (`drop`).
3. REJOINING   the registry is readable again after an outage, or its id changed (a new,
               empty redis-server): for `rejoin_grace_s` a worker missing from it is kept,
               since the workers are still re-registering; then READABLE. A record of a new
               incarnation still replaces the old one at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pdserve.protocol import WorkerRecord, WorkerRole, WorkerState
from pdserve.router.policy import WorkerLoad
from pdserve.router.registry import RegistryErrors, read_registry
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)
HandleFactory = Callable[[WorkerRecord], object]


@dataclass(eq=False)
class LiveWorker:
    record: WorkerRecord
    handle: object  # router.handles.DecodeHandle / PrefillHandle, as its role offers
    in_flight: dict[str, asyncio.Queue] = field(default_factory=dict)  # transfer id -> stream

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def load(self) -> WorkerLoad:
        r = self.record
        return WorkerLoad(r.worker_id, r.free_blocks, r.total_blocks, r.block_size, r.running,
                          r.waiting, r.queued_prefill_tokens, len(self.in_flight))


@dataclass(frozen=True)
class Gone:
    """Put in a request's stream queue when a worker that holds its job disappears."""

    worker_id: str


class ClusterView:
    def __init__(self, redis, connect: HandleFactory, rejoin_grace_s: float = 10.0):
        """`rejoin_grace_s`: after the registry comes back (or is replaced by an empty
        one), how long a worker may take to re-register before the view drops it; well
        above the workers' heartbeat retry period (at most 2 s unless their beat interval
        is longer: deploy.heartbeat)."""
        self.redis = redis
        self._connect = connect
        self.rejoin_grace_s = rejoin_grace_s
        self.workers: dict[str, LiveWorker] = {}
        self.changed = asyncio.Condition()
        self.unreachable_since: float | None = None  # monotonic; None while readable
        self._registry_id: str | None = None
        self._read_once = False
        self._grace_until = 0.0  # monotonic

    async def refresh(self) -> None:
        """Take the registry's view: new workers join, expired or restarted ones leave.
        When the registry cannot be read the view stays as it was (never raises for it)."""
        try:
            registry = await read_registry(self.redis)
        except RegistryErrors as e:
            self._lost_registry(e)
            return
        now = time.monotonic()
        self._found_registry(registry.registry_id, now)
        records = {r.worker_id: r for r in registry.records}
        rejoining = now < self._grace_until
        for worker_id, worker in list(self.workers.items()):
            record = records.get(worker_id)
            if record is None and rejoining:
                continue  # not re-registered yet: no sign that it died
            if record is None or record.started != worker.record.started:
                self.drop(worker_id)  # gone, or restarted: what it held is lost
        for worker_id, record in records.items():
            known = self.workers.get(worker_id)
            if known is None:
                try:
                    handle = self._connect(record)
                except Exception as e:  # noqa: BLE001 - one unreachable worker is not fatal
                    log.error("cannot reach worker %s: %s", worker_id, e)
                    continue
                self.workers[worker_id] = LiveWorker(record, handle)
            else:
                known.record = record
        await self.notify()

    def _lost_registry(self, error: BaseException) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            log.warning("the registry cannot be read (%s); serving on the last view of %d "
                        "workers until it answers", error, len(self.workers))

    def _found_registry(self, registry_id: str | None, now: float) -> None:
        if self.unreachable_since is not None:
            log.warning("the registry answers again after %.1f s; workers have %.1f s to "
                        "re-register", now - self.unreachable_since, self.rejoin_grace_s)
            self.unreachable_since = None
            self._grace_until = now + self.rejoin_grace_s
        if registry_id != self._registry_id:
            if self._read_once:
                if self._registry_id is not None:  # (None -> an id: the first writer)
                    log.warning("the registry was reset (a new Redis?); workers have %.1f s "
                                "to re-register", self.rejoin_grace_s)
                self._grace_until = now + self.rejoin_grace_s
            self._registry_id = registry_id
        self._read_once = True

    def drop(self, worker_id: str) -> None:
        """The worker left: every request it held is told (idempotent)."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        log.warning("worker %s left the view; failing its %d requests", worker_id,
                    len(worker.in_flight))
        for q in worker.in_flight.values():
            q.put_nowait(Gone(worker_id))

    def of_role(self, *roles: WorkerRole) -> list[LiveWorker]:
        """The workers of `roles` that take new orders: a worker draining before a role
        switch is left out, while the requests it holds go on."""
        return [w for w in self.workers.values() if w.record.role in roles and w.record.serving]

    def not_serving(self, worker_id: str) -> None:
        """A worker refused an order as not serving (it drains, or changed role): it is
        left out of `of_role` until its next record says otherwise."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.record = replace(worker.record, state=WorkerState.DRAINING)

    async def notify(self) -> None:
        """Wake the requests that wait for a worker, a slot or blocks."""
        async with self.changed:
            self.changed.notify_all()

    async def wait_for_change(self, timeout_s: float) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout_s)
            except TimeoutError:
                pass

    def status(self, router_id: str) -> pb.ClusterStatus:
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w.worker_id):
            r = w.record
            used = 1 - r.free_blocks / r.total_blocks if r.total_blocks else 0.0
            workers.append(pb.WorkerStatus(
                worker_id=r.worker_id, role=r.role.value, node=r.node, kv_endpoint=r.kv_endpoint,
                total_blocks=r.total_blocks, free_blocks=r.free_blocks, running=r.running,
                waiting=r.waiting, queued_prefill_tokens=r.queued_prefill_tokens,
                in_flight=len(w.in_flight), last_heartbeat=r.heartbeat, kv_usage=used,
                leases=r.leases, state=r.state.value, adaptive=r.adaptive,
                role_since=r.role_since))
        return pb.ClusterStatus(workers=workers, router_id=router_id)
