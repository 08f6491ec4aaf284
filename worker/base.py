"""What every worker is built on (DESIGN §2): an engine, the engine loop that drives it
from its own thread with the worker's job table, the stream publisher to the routers, and
the face the router's handles call.

Life of a worker:
1. STARTING  the engine loads the model and runs its warm-up pass (engine.Engine, Warm-up:
             every block free and the prefix cache empty after it; `warmup` says what it
             ran); the role builds its job table (with its KV sender or receiver) on the
             engine; the loop thread starts. Whoever registers the worker does so once the
             constructor returned, so a worker is routable only when warm.
2. SERVING   orders arrive from any thread. Each is checked in the caller's thread (a bad
             order raises ValueError and leaves nothing behind) and handed to the loop,
             which applies it between two steps: no call waits for a step, and no call
             stays open for the life of a job; outcomes and tokens go to the router's
             stream endpoint. `load()` is the last snapshot; `job_state()` a published copy.
   An adaptive worker changes role between SERVING periods (worker.switch): it drains,
   then the same engine serves under the new role's job table; `role_status()` says
   where it stands.
3. CLOSED    `close()` stops the loop after the step in progress; the job table ends every
             live job (an error chunk or outcome to its router) and closes its sockets. A
             broken loop (a fault outside any one request: the engine's books, the job
             table) ends the same way, and `load().error` says why; later calls raise
             RuntimeError. A job whose own computation fails ends alone, with an error
             chunk (decode, colocated) or a FAILED outcome (prefill) naming the cause.

Lost jobs end by themselves (`JobTable.sweep`, every loop turn), freeing all they hold,
whether or not the router is there to abort them:
- Deadlines: a job whose order's deadline passed (its client gave up).
- Orphans: a job whose router is gone, its token stream unreachable for
  `config.stream_grace_s` (worker.publisher: bounds). Jobs of other routers go on.
- Tombstones: an abort is final for its transfer id. An order that reaches the loop after
  its abort (a router's call that timed out on a worker that hung, applied when it resumed,
  after the abort sent later on another connection) is ended as soon as it is added, for
  TOMBSTONE_S after the abort.
"""

from __future__ import annotations

import enum
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping

from pdserve.engine import Engine, WarmUp
from pdserve.protocol import WorkerRole
from pdserve.worker.config import WorkerConfig
from pdserve.worker.loop import EngineLoop, LoadReport, LoopHandler
from pdserve.worker.publisher import StreamPublisher
from pdserve.worker.switch import RoleStatus, RoleSwitch, TableFactory

log = logging.getLogger(__name__)
TOMBSTONE_S = 60.0  # how long an abort of an unknown transfer id ends a late order for it
_MAX_TOMBSTONES = 100_000
_ORPHAN_CHECK_S = 0.1  # how often the routers' streams are checked


class JobTable(LoopHandler):
    """A worker's live jobs by transfer id (`jobs`: each entry has the `order` it runs).
    Every method runs on the loop thread; `states` is the copy of each live job's state
    that other threads read."""

    LEASED: frozenset[enum.Enum] = frozenset()  # the states that hold KV under a lease

    def __init__(self, engine: Engine, publisher: StreamPublisher):
        self.engine = engine
        self.publisher = publisher
        self.jobs: dict = {}
        self.states: dict[str, enum.Enum] = {}
        self._tombstones: dict[str, float] = {}  # transfer id -> monotonic time, oldest first
        self._next_orphan_check = 0.0

    @abstractmethod
    def abort(self, transfer_id: str, reason: str) -> None:
        """End a live job, freeing everything it holds; unknown ids are ignored."""

    @abstractmethod
    def router_endpoint(self, entry) -> str:
        """The stream endpoint of the router that ordered the job `entry` (from its order)."""

    def abort_ordered(self, transfer_id: str, reason: str) -> None:
        """The router's abort: end the job, or, if it is not here (yet), end its order when it
        comes (Tombstones)."""
        if transfer_id in self.jobs:
            self.abort(transfer_id, reason)
            return
        self._tombstones.pop(transfer_id, None)
        self._tombstones[transfer_id] = time.monotonic()
        if len(self._tombstones) > _MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]

    def sweep(self) -> None:
        """End every lost job (the module's Deadlines, Orphans, Tombstones). The job tables
        call it at the start of each `tick`, before the step."""
        self.end_expired()
        self._end_aborted_before_arrival()
        self._end_orphans()

    def end_expired(self) -> None:
        """Abort every job whose order's deadline passed: its client has given up. Called
        each turn before the step, so a job that arrived expired, or expired while queued,
        never runs its prefill, and blocks are freed whether or not the router's abort
        comes."""
        now = time.time()
        for tid in [t for t, e in self.jobs.items() if e.order.expired(now)]:
            self.abort(tid, "the request's deadline passed")

    def num_jobs(self) -> int:
        return len(self.states)

    def num_leases(self) -> int:
        return sum(1 for state in self.states.values() if state in self.LEASED)

    def _end_aborted_before_arrival(self) -> None:
        if not self._tombstones:
            return
        cutoff = time.monotonic() - TOMBSTONE_S
        while self._tombstones and next(iter(self._tombstones.values())) < cutoff:
            del self._tombstones[next(iter(self._tombstones))]
        for tid in self._tombstones.keys() & self.jobs.keys():
            del self._tombstones[tid]
            self.abort(tid, "aborted by the router before the order arrived")

    def _end_orphans(self) -> None:
        now = time.monotonic()
        if now < self._next_orphan_check:
            return
        self._next_orphan_check = now + _ORPHAN_CHECK_S
        by_router: dict[str, list[str]] = {}
        for tid, entry in self.jobs.items():
            by_router.setdefault(self.router_endpoint(entry), []).append(tid)
        for endpoint in self.publisher.unreachable(by_router.keys()):
            log.warning("the router at %s is gone (its stream unreachable for %gs): ending "
                        "its %d jobs", endpoint, self.publisher.grace_s, len(by_router[endpoint]))
            for tid in by_router[endpoint]:
                self.abort(tid, f"the router's stream {endpoint} is gone")


def publisher_for(config: WorkerConfig) -> StreamPublisher:
    """A job table's stream to the routers."""
    return StreamPublisher(config.worker_id, config.stream_grace_s, curve=config.curve)


class Worker:
    role: WorkerRole  # a fixed-role worker's; an adaptive one's is its present role

    def __init__(self, config: WorkerConfig, tables: Mapping[WorkerRole, TableFactory]):
        """`tables`: the job table of each role the worker may serve, built on its engine;
        `config.role` is the one it starts in."""
        if config.role not in tables:
            raise ValueError(f"{type(self).__name__} needs a "
                             f"{' or '.join(r.value for r in tables)} config, got "
                             f"{config.role.value}")
        self.engine = Engine(config.engine)
        self.warmup: WarmUp = self.engine.warm_up()
        log.info("worker %s warmed up in %.2fs (%d prefill and %d decode steps)",
                 config.worker_id, self.warmup.seconds, self.warmup.prefill_steps,
                 self.warmup.decode_steps)
        self._switch = RoleSwitch(config, self.engine, tables)
        self._loop = EngineLoop(self.engine, self._switch, name=f"{config.worker_id}-loop")

    @property
    def config(self) -> WorkerConfig:
        """Its configuration in its present role."""
        return self._switch.config

    @property
    def _jobs(self) -> JobTable:
        """The present role's job table (another object after a switch)."""
        return self._switch.table

    def role_status(self) -> RoleStatus:
        """Its role, whether it takes new orders, and where it drains to (worker.switch)."""
        return self._switch.status()

    def switch_role(self, role: WorkerRole) -> bool:
        """Drain, then serve as `role` (worker.switch); returns at once, True when this
        changed anything. Raises ValueError for a worker that is not adaptive (asked for
        another role) and RuntimeError once it is closed."""
        if not self.config.adaptive and role is not self._switch.status().role:
            raise ValueError(f"worker {self.worker_id} is not adaptive: it stays "
                             f"{self._switch.status().role.value}")
        self._check_open()
        return self._switch.request(role, self._loop.post)

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def kv_endpoint(self) -> str:
        """Where prefill workers send KV to this worker ("" unless it receives KV)."""
        return ""

    def abort(self, transfer_id: str) -> None:
        """End a job in any live state, freeing all it holds; idempotent. An unknown id is
        remembered for a while: an order for it that comes later is ended at once (the
        module's Tombstones). Does not wait: the job's end reaches the router like any
        other."""
        self._loop.post(lambda: self._jobs.abort_ordered(transfer_id, "aborted by the router"))

    def job_state(self, transfer_id: str) -> enum.Enum | None:
        """The live job's state, or None once it ended (or was never seen)."""
        return self._jobs.states.get(transfer_id)

    def load(self) -> LoadReport:
        return self._loop.load()

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        """Block hashes that entered and left this worker's prefix cache since the last call
        (the first call starts the record): what the cluster's prefix index keeps."""
        return self._loop.drain_prefix_events()

    def close(self) -> None:
        """End every live job, close the sockets, stop the loop; idempotent."""
        self._loop.close()

    def _check_open(self) -> None:
        if (reason := self._loop.closed_reason) is not None:
            raise RuntimeError(reason)

    def _apply(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the loop thread between steps, without waiting for it. Raises
        RuntimeError when the loop has stopped (the worker is closed or broken)."""
        future = self._loop.call(fn)
        if future.done() and future.exception() is not None:
            raise future.exception()
