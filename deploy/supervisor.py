"""Restarts the worker processes of a local cluster that die or whose engine loop broke
(`pdserve serve --no-ray`; on Ray, Ray restarts the actors: deploy.ray_actors).

Life of a supervised worker (one watcher thread each, `supervise-<id>`):
1. WATCHED    the watcher waits for the process to exit (its sentinel) and every `probe_s`
              asks the worker's `load()`: a non-empty `error` means its engine loop broke,
              which by contract never recovers, so the worker would only refuse work. A
              worker that does not answer (hung, SIGSTOP) is neither dead nor broken: the
              watcher waits for its answer, and it rejoins when it resumes.
2. FAILED     `members.end(id)` stops the process (killed if it does not exit in time) and
              takes it out of the registry at once, so routers drop it at their next
              refresh rather than when its heartbeat expires.
3. RESTARTED  if its budget allows (at most `max_restarts` within any `window_s`),
              `members.start(id)` starts a new process with the same id and configuration
              and a new heartbeat: a new incarnation (its registry `started` differs),
              which routers treat as the old worker gone and a new one come, connecting to
              it anew. Back to 1. A start that fails counts as a restart and is tried again
              after `backoff_s`.
   DOWN       past the bound the worker stays down, logged at CRITICAL; the routers' health
              shows it when no other worker of its role is live.
`close()` stops the watchers, waiting for a restart in progress to finish, so that the
cluster stops every process it has, the restarted ones included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Protocol

from pdserve.deploy.local import WorkerProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3  # per worker, within any `window_s`; 0: a failed worker stays down
    window_s: float = 600.0
    probe_s: float = 0.5  # how often a live worker's engine loop is checked
    stop_timeout_s: float = 10.0  # a failed worker that does not exit by then is killed
    backoff_s: float = 1.0  # before trying again a restart that failed to start

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("window_s", "probe_s", "stop_timeout_s", "backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class RestartBudget:
    """The restarts of one worker: at most `policy.max_restarts` within any
    `policy.window_s` seconds."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic):
        self._policy = policy
        self._clock = clock
        self._times: deque[float] = deque()

    def take(self) -> bool:
        """Spend one restart now; False (nothing spent) when the bound is reached."""
        now = self._clock()
        while self._times and self._times[0] <= now - self._policy.window_s:
            self._times.popleft()
        if len(self._times) >= self._policy.max_restarts:
            return False
        self._times.append(now)
        return True


class Members(Protocol):
    """What the supervisor needs of a cluster, per worker id."""

    def process(self, worker_id: str) -> WorkerProcess:
        """The worker's current process."""

    def end(self, worker_id: str) -> None:
        """Stop the current process and unregister it; idempotent."""

    def start(self, worker_id: str) -> None:
        """A new process and heartbeat with the worker's id and configuration; raises if it
        cannot start (what it started is then ended by `end`)."""


class Supervisor:
    def __init__(self, members: Members, worker_ids: Iterable[str], policy: RestartPolicy):
        self.policy = policy
        self._members = members
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._restarts: dict[str, int] = {}
        self._down: set[str] = set()
        self._starting: set[str] = set()  # a restart in progress: close() waits for it
        self._worker_ids = tuple(worker_ids)
        self._threads = [threading.Thread(target=self._watch, args=(worker_id,),
                                          name=f"supervise-{worker_id}", daemon=True)
                         for worker_id in self._worker_ids]
        for thread in self._threads:
            thread.start()

    def restarts(self, worker_id: str) -> int:
        """How many times the worker was restarted so far."""
        with self._lock:
            return self._restarts.get(worker_id, 0)

    def is_down(self, worker_id: str) -> bool:
        """The worker failed past its restart bound and stays down."""
        with self._lock:
            return worker_id in self._down

    def close(self, start_timeout_s: float = 330.0) -> None:
        """Stop watching. A restart in progress finishes first (up to `start_timeout_s`: a
        model load), so that its process is the cluster's to stop; a watcher blocked on a
        hung worker's answer is left behind, and acts on nothing once it returns."""
        self._stop.set()
        for thread, worker_id in zip(self._threads, self._worker_ids, strict=True):
            with self._lock:
                starting = worker_id in self._starting
            thread.join(start_timeout_s if starting else self.policy.probe_s + 5.0)

    def _watch(self, worker_id: str) -> None:
        budget = RestartBudget(self.policy)
        try:
            while True:
                why = self._failure(self._members.process(worker_id))
                if why is None:
                    return
                log.error("worker %s failed: %s", worker_id, why)
                self._members.end(worker_id)
                if not self._restart(worker_id, budget):
                    return
        except Exception:  # noqa: BLE001 - a supervisor that dies silently supervises nothing
            log.critical("supervising worker %s failed; it is no longer restarted",
                         worker_id, exc_info=True)
            with self._lock:
                self._down.add(worker_id)

    def _restart(self, worker_id: str, budget: RestartBudget) -> bool:
        """Start the worker again within its budget; False when it stays down (or the
        supervisor closes)."""
        while not self._stop.is_set():
            if not budget.take():
                p = self.policy
                log.critical("worker %s stays DOWN: its %d restarts within %.0fs are spent",
                             worker_id, p.max_restarts, p.window_s)
                with self._lock:
                    self._down.add(worker_id)
                return False
            with self._lock:
                if self._stop.is_set():  # close() no longer waits for a start
                    return False
                self._starting.add(worker_id)
            try:
                self._members.start(worker_id)
            except Exception as e:  # noqa: BLE001 - a failed start counts, and is retried
                log.error("restarting worker %s failed: %s", worker_id, e)
                self._members.end(worker_id)
                self._stop.wait(self.policy.backoff_s)
                continue
            finally:
                with self._lock:
                    self._starting.discard(worker_id)
            with self._lock:
                self._restarts[worker_id] = n = self._restarts.get(worker_id, 0) + 1
            log.warning("worker %s restarted (restart %d; at most %d within %.0fs)",
                        worker_id, n, self.policy.max_restarts, self.policy.window_s)
            return True
        return False

    def _failure(self, proc: WorkerProcess) -> str | None:
        """Wait until the process exits or its engine loop breaks: why; None once the
        supervisor closes."""
        while not self._stop.is_set():
            if wait([proc.process.sentinel], timeout=self.policy.probe_s):
                proc.kill()  # reaps it
                return f"its process exited with code {proc.exitcode}"
            try:
                error = proc.worker.load().error
            except Exception:  # noqa: BLE001 - it is exiting: the sentinel tells next turn
                continue
            if error and not self._stop.is_set():
                return f"its engine loop broke: {error}"
        return None
