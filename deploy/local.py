"""Workers in child processes on this machine, without Ray.

Each worker gets its own process (and, given `cpus`, its own cores), as it would on a
cluster; the parent calls it through a `multiprocessing.managers` proxy whose methods are
the worker's public ones. Benchmarks and tests use this to run the real data path (KV over
ZMQ between processes, the token stream) without a Ray cluster.

Life of a worker process:
1. STARTING  `WorkerProcess(config, cpus)` starts a child (spawn context). The child
             pins itself to `cpus` and sets torch's threads to match (DESIGN §5), builds the
             worker (loading the model, warming it up), given a `heartbeat` registers it
             and starts its heartbeat there (deploy.heartbeat: the worker's own process
             vouches that it lives, whatever the parent is busy with), starts a manager
             server on a Unix socket in a directory of its own and reports the incarnation
             it registered (`started`: its registry record's, None unregistered), or the
             error that stopped it (raised here as WorkerStartError). The address is new
             for every process: multiprocessing keeps each thread's connection per server
             address, so a worker that listened where a dead one had would be called over
             the dead one's connections (EOFError at its first call from those threads).
2. SERVING   `.worker` is a proxy; each calling thread gets its own connection, so calls
             run concurrently, as the workers' thread-safe methods allow.
3. STOPPED   `stop()` stops the heartbeat (unregistering), closes the worker (its jobs
             end, its sockets close) and the process exits; `kill()` is SIGKILL, as a
             crash would be (the entry then expires). Calls then raise ConnectionError or
             EOFError. Both may be called from any thread (a test and the supervisor at
             once): only one of them reaps the process. The child runs in its own process
             group, so signals meant for the parent's group (a terminal's Ctrl-C) do not
             reach it; if the parent dies without stopping it, the child stops itself the
             same way. The socket's directory is removed once the process is reaped.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.managers import BaseManager

from pdserve.decode_worker import ColocatedWorker, DecodeWorker
from pdserve.deploy.adaptive_worker import AdaptiveWorker
from pdserve.deploy.heartbeat import Heartbeat, HeartbeatConfig
from pdserve.deploy.logs import configure_logging
from pdserve.engine.cpu_kernels import build_dir, build_in_progress
from pdserve.prefill_worker import PrefillWorker
from pdserve.protocol import WorkerRole
from pdserve.worker import Worker, WorkerConfig

_COMMON = ("abort", "job_state", "load", "kv_endpoint", "drain_prefix_events", "close",
           "role_status", "switch_role")
_ANY_ROLE = ("submit", "reserve", "generate")
_CLASSES = {WorkerRole.PREFILL: (PrefillWorker, ("submit",)),
            WorkerRole.DECODE: (DecodeWorker, ("reserve", "generate")),
            WorkerRole.COLOCATED: (ColocatedWorker, ("generate",))}


_log = logging.getLogger(__name__)
_LIFELINE_POLL_S = 1.0  # how soon a worker whose sentinel misled it notices its parent gone
_BUILD_POLL_S = 1.0  # how often a start that waits for a kernel build looks again
_MAX_SOCKET_DIR = 90  # sun_path holds 108 bytes on Linux, 104 on macOS, with the file name


class WorkerStartError(RuntimeError):
    """The worker process could not start; the message holds the child's error."""


def build_worker(config: WorkerConfig) -> Worker:
    """The worker of `config.role` (any role, if adaptive), in this process (loads the
    model)."""
    if config.adaptive:
        return AdaptiveWorker(config)
    return _CLASSES[config.role][0](config)


def exposed_methods(role: WorkerRole, adaptive: bool = False) -> tuple[str, ...]:
    """The methods a worker of `role` (or an adaptive one) offers its callers."""
    return (_ANY_ROLE if adaptive else _CLASSES[role][1]) + _COMMON


class _Manager(BaseManager):
    pass


_Manager.register("worker")


class WorkerProcess:
    def __init__(self, config: WorkerConfig, cpus: tuple[int, ...] | None = None,
                 num_threads: int | None = None, start_timeout_s: float = 300.0,
                 heartbeat: HeartbeatConfig | None = None,
                 build: Callable[[WorkerConfig], Worker] = build_worker):
        """`cpus`: cores to pin the process to (torch then uses that many threads);
        `num_threads`: torch threads when not pinned (default: torch's own choice);
        `heartbeat`: where the worker registers itself (none: it is not registered);
        `build`: makes the worker in the child from `config` (a module-level function: the
        child imports it by name)."""
        self.role = role = config.role
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe(duplex=False)
        authkey = os.urandom(16)
        self._socket_dir = _socket_dir()
        self.address = address = os.path.join(self._socket_dir, "manager.sock")
        self.process = ctx.Process(
            target=_serve, args=(config, cpus, num_threads, heartbeat, child_conn, authkey,
                                 build, address),
            name=f"pdserve-{role.value}", daemon=True)
        # one thread at a time waits for the process: a second waitpid would find it gone
        # and take it for alive (multiprocessing.Process is not thread-safe)
        self._reaping = threading.RLock()
        self.process.start()
        child_conn.close()
        if not _await_start(conn, start_timeout_s):
            self.kill()
            raise WorkerStartError(f"{role.value} worker did not start in {start_timeout_s}s")
        try:
            status, detail = conn.recv()
        except EOFError:
            status, detail = "error", f"exited with code {self.process.exitcode}"
        if status != "ready":
            self.process.join(10)
            self.kill()
            raise WorkerStartError(f"{role.value} worker failed to start: {detail}")
        self.started = detail
        self._manager = _Manager(address=address, authkey=authkey)
        self._manager.connect()
        self.worker = self._manager.worker()

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        with self._reaping:
            return self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        """The process's exit code (negative: the signal that ended it); None while it
        runs."""
        with self._reaping:
            return self.process.exitcode

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close the worker and end the process (killed if it does not exit in time)."""
        with self._reaping:
            if self.process.is_alive():
                os.kill(self.process.pid, signal.SIGTERM)
                self.process.join(timeout_s)
            self.kill()

    def kill(self) -> None:
        with self._reaping:
            if self.process.is_alive():
                self.process.kill()
            self.process.join()
            shutil.rmtree(self._socket_dir, ignore_errors=True)


def _socket_dir() -> str:
    """A new private directory for a worker's socket: under $TMPDIR, or /tmp where that
    path would be too long for a Unix socket's address (about 100 bytes)."""
    folder = tempfile.mkdtemp(prefix="pdserve-worker-")
    if len(folder) > _MAX_SOCKET_DIR:
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix="pdserve-worker-", dir="/tmp")
    return folder


def _await_start(conn, timeout_s: float) -> bool:
    """Whether the child answered (ready, failed or gone) within `timeout_s`, or later while
    the CPU kernels compile: a build on the worker's own pinned core can take minutes, and
    it happens once per machine, not per worker (engine.cpu_kernels)."""
    if conn.poll(timeout_s):
        return True
    waited = False
    while build_in_progress():
        if not waited:
            _log.warning("a worker still starts after %.0fs: waiting for the CPU kernels' "
                         "build in progress (%s)", timeout_s, build_dir())
            waited = True
        if conn.poll(_BUILD_POLL_S):
            return True
    return conn.poll(0)


def _serve(config: WorkerConfig, cpus, num_threads, heartbeat: HeartbeatConfig | None, conn,
           authkey: bytes, build: Callable[[WorkerConfig], Worker], address: str) -> None:
    """Child process: build the worker (and its heartbeat) and serve its methods until
    SIGTERM."""
    # Its own process group: a terminal's Ctrl-C (or a signal to the parent's group) reaches
    # the parent only, which then stops its workers in order (unregistered before Redis
    # goes); the lifeline below ends the worker if the parent dies without doing so.
    os.setpgid(0, 0)
    # a native crash (SIGSEGV, SIGABRT) says where it happened, in the server's log
    faulthandler.enable()
    try:
        import torch

        configure_logging()
        if cpus:
            os.sched_setaffinity(0, cpus)
            num_threads = len(cpus)
        if num_threads:
            torch.set_num_threads(num_threads)
        worker = build(config)
        beat = (Heartbeat(heartbeat, worker, config.worker_id, config.role, config.adaptive)
                if heartbeat is not None else None)
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
        return

    class Server(BaseManager):
        pass

    Server.register("worker", callable=lambda: worker,
                    exposed=exposed_methods(config.role, config.adaptive))
    server = Server(address=address, authkey=authkey).get_server()

    stopping = threading.Lock()

    def shutdown(*_) -> None:
        if not stopping.acquire(blocking=False):
            return  # the other path is already stopping it
        if beat is not None:
            beat.stop()
        worker.close()
        os._exit(0)

    def lifeline() -> None:
        parent = mp.parent_process()
        wait([parent.sentinel])
        # The sentinel reads EOF once the parent's end of its pipe is closed: when the parent
        # exits, but also when a stray close in the parent hits that descriptor. Only a new
        # parent pid (this process adopted) says the server is gone.
        if os.getppid() == parent.pid:
            _log.warning("the server's sentinel closed while it runs (pid %d): watching its "
                         "pid instead", parent.pid)
            while os.getppid() == parent.pid:
                time.sleep(_LIFELINE_POLL_S)
        _log.warning("the server (pid %d) has gone: stopping", parent.pid)
        shutdown()

    signal.signal(signal.SIGTERM, shutdown)
    threading.Thread(target=lifeline, name="pdserve-lifeline", daemon=True).start()
    conn.send(("ready", beat.started if beat is not None else None))
    conn.close()
    server.serve_forever()
