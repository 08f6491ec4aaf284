"""Changing a worker's role at run time, without a new process or a model load: the same
Engine object (weights, KV cache, prefix cache) under another mode, with the new role's job
table (its KV sender or receiver, its stream sockets) built around it.

Life of a switch (worker.base.Worker.switch_role; only an adaptive worker switches):
1. SERVING    the worker takes orders of its role.
2. DRAINING   `switch_role(target)` (any thread, returns at once): from now on the worker
              refuses new orders (`NotServing`, nothing held; the router sends them
              elsewhere) and its registry record says DRAINING, so routers stop choosing
              it. The jobs it holds run to their end as usual: decodes finish, a prefill
              job's KV goes to its decode worker (or, HELD, waits for its re-send or its
              `hold_s`). A second `switch_role` during the drain replaces the target; one
              back to the present role ends the drain (SERVING again, nothing changed).
              Jobs still live `drain_timeout_s` after the drain began are ended (an error
              chunk or a FAILED outcome: the router dispatches or migrates them again).
3. SWITCHED   once the job table and the engine hold nothing (every block free): the old
              table closes (sender or receiver, stream sockets), the engine changes mode,
              the new role's table is built on it, and the worker is SERVING in the new
              role, with `since` now. A request for the role the worker already serves is
              a no-op.

Ordering: a marker of each request goes through the engine loop's call queue, after any
order the worker accepted before the request; the switch happens only once the marker of
the latest request has been applied (sequence numbers), so an accepted order is always
added to the table of the role that accepted it, never to the next one.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pdserve.engine import Engine
from pdserve.protocol import WorkerRole, WorkerState
from pdserve.worker.config import ENGINE_MODES, WorkerConfig
from pdserve.worker.loop import LoopHandler

if TYPE_CHECKING:
    from pdserve.worker.base import JobTable

log = logging.getLogger(__name__)


class NotServing(RuntimeError):
    """The worker takes no order of this kind now (it is draining, or serves another role).
    Nothing is held: the caller sends the order to another worker."""


@dataclass(frozen=True)
class RoleStatus:
    """A worker's role as its registry record shows it."""

    role: WorkerRole
    state: WorkerState
    since: float  # time.time() it took the role
    adaptive: bool
    kv_endpoint: str = ""  # where KV is sent to it ("" unless its role receives KV)
    target: WorkerRole | None = None  # the role it drains toward
    switches: int = 0  # role changes since it started


class Phase(enum.Enum):
    """The loop thread's side of a switch: whether the latest request reached it."""

    IDLE = "idle"
    REQUESTED = "requested"  # a request was made; its marker is in the call queue
    DRAINING = "draining"  # its marker was applied: the switch happens once all is free


# the role's job table, built on the worker's engine: (config, engine) -> JobTable
TableFactory = Callable[[WorkerConfig, Engine], "JobTable"]


class RoleSwitch(LoopHandler):
    """The engine loop's handler: the present role's job table (`table`), and a switch in
    progress (the module's life). Every LoopHandler method runs on the loop thread;
    `request`, `status` and `gate` may be called from any thread."""

    def __init__(self, config: WorkerConfig, engine: Engine,
                 tables: Mapping[WorkerRole, TableFactory]):
        self.config = config
        self.engine = engine
        self._tables = tables
        self.table = tables[config.role](config, engine)
        self.lock = threading.Lock()  # status, and a switch against a caller's order
        self._status = RoleStatus(config.role, WorkerState.SERVING, time.time(),
                                  config.adaptive, self._endpoint())
        self._seq = 0  # requests made (caller side)
        self._seen = 0  # requests whose marker the loop applied
        self._drain_started = 0.0  # monotonic

    def status(self) -> RoleStatus:
        return self._status

    def check(self, *roles: WorkerRole) -> None:
        """Raise NotServing unless the worker serves one of `roles`; the caller holds
        `lock` while it checks and hands its order to the loop."""
        s = self._status
        if s.state is not WorkerState.SERVING or s.role not in roles:
            doing = (f"draining toward {s.target.value}" if s.state is WorkerState.DRAINING
                     else f"serving as {s.role.value}")
            raise NotServing(f"worker {self.config.worker_id} is {doing}")

    def request(self, target: WorkerRole, post: Callable[[Callable[[], object]], None]) -> bool:
        """Begin (or redirect, or end) a drain toward `target`; True when this changed
        anything. `post` queues the request's marker on the loop."""
        if target not in self._tables:
            raise ValueError(f"worker {self.config.worker_id} cannot serve as {target.value}")
        with self.lock:
            s = self._status
            if s.state is WorkerState.SERVING and target is s.role:
                return False
            if s.state is WorkerState.DRAINING and target is s.target:
                return False
            self._seq += 1
            seq = self._seq
            if target is s.role:  # the drain is called off
                self._status = replace(s, state=WorkerState.SERVING, target=None)
            else:
                self._status = replace(s, state=WorkerState.DRAINING, target=target)
                if s.state is WorkerState.SERVING:
                    self._drain_started = time.monotonic()
            log.info("worker %s: %s -> %s requested", self.config.worker_id, s.role.value,
                     target.value)
        post(lambda: self._mark(seq))
        return True

    # -- LoopHandler: the table's, then the switch ------------------------------------------

    def before_step(self, batch):
        return self.table.before_step(batch)

    def after_step(self, outputs) -> None:
        self.table.after_step(outputs)

    def tick(self) -> None:
        self.table.tick()
        if self._seen == self._seq and self._status.state is WorkerState.DRAINING:
            self._advance_drain()

    def idle_wait(self) -> float:
        draining = self._status.state is WorkerState.DRAINING
        return min(self.table.idle_wait(), 0.01) if draining else self.table.idle_wait()

    def num_jobs(self) -> int:
        return self.table.num_jobs()

    def num_leases(self) -> int:
        return self.table.num_leases()

    def close(self) -> None:
        self.table.close()

    # -- internals (loop thread) -----------------------------------------------------------

    def _mark(self, seq: int) -> None:
        self._seen = max(self._seen, seq)

    def _advance_drain(self) -> None:
        if time.monotonic() - self._drain_started > self.config.drain_timeout_s:
            live = list(self.table.jobs)
            if live:
                log.warning("worker %s: ending %d jobs still live after a %gs drain",
                            self.config.worker_id, len(live), self.config.drain_timeout_s)
            for tid in live:
                self.table.abort(tid, "the worker changes role")
        e = self.engine.stats()
        if (self.table.num_jobs() or e.num_running or e.num_waiting or e.num_reserved
                or e.num_free_blocks != e.num_total_blocks):
            return
        with self.lock:
            s = self._status
            if self._seen != self._seq or s.state is not WorkerState.DRAINING:
                return  # a newer request is on its way through the queue
            self._switch(s.role, s.target)

    def _switch(self, old: WorkerRole, new: WorkerRole) -> None:
        started = time.perf_counter()
        self.table.close()
        self.engine.set_mode(ENGINE_MODES[new])
        self.config = self.config.for_role(new)
        self.table = self._tables[new](self.config, self.engine)
        s = self._status
        self._status = RoleStatus(new, WorkerState.SERVING, time.time(), s.adaptive,
                                  self._endpoint(), None, s.switches + 1)
        log.warning("worker %s switched role %s -> %s (drained in %.2fs, rebuilt in %.3fs)",
                    self.config.worker_id, old.value, new.value,
                    time.monotonic() - self._drain_started, time.perf_counter() - started)

    def _endpoint(self) -> str:
        receiver = self.table.receiver if self.config.role.receives_kv else None
        return receiver.endpoint if receiver is not None else ""
