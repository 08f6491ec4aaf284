"""The pieces of a torch.distributed payload pair: a 2-rank process group per sender-receiver
pair (sender rank 0, receiver rank 1) over the pair's rendezvous store
(kvtransfer.pair_store), and the worker thread that alone uses it.

Life of a pair worker: its thread builds the group (blocking until the peer joins, or the
group's timeout), then runs the submitted work items in order; a group operation that
raises (the peer vanished, the timeout passed) records `error`, after which the pair is
dead and the owner drops it. `close` stops the thread after the work already queued.
"""

from __future__ import annotations

import datetime
import queue
import socket
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

TAG = 0


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def endpoint_host(endpoint: str) -> str:
    """The address of the host behind ZMQ `endpoint` (a gloo device listens there): its
    tcp:// host; for a wildcard bind, this machine's address on the default route;
    loopback for ipc://."""
    if not endpoint.startswith("tcp://"):
        return "127.0.0.1"
    host = endpoint.removeprefix("tcp://").rpartition(":")[0] or "*"
    if host in ("*", "0.0.0.0"):
        return local_address_towards("192.0.2.1")  # TEST-NET-1: only the route is looked up
    return host


def local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def make_group(backend: str, store: dist.Store, rank: int, address: str,
               timeout: datetime.timedelta, device: torch.device):
    """A 2-rank process group over `store`; blocks until the peer joins or `timeout`."""
    if backend == "nccl":  # pragma: no cover - needs CUDA
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(store, rank, 2, options)


class PairWorker:
    """One pair's group and the thread that alone uses it. `submit` never blocks."""

    def __init__(self, name: str, connect: Callable[[], object],
                 work: Callable[[PairWorker, object], None],
                 on_error: Callable[[], None] = lambda: None):
        self._connect, self._work, self._on_error = connect, work, on_error
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.group = None
        self.error: str | None = None  # set once the group failed; the pair is then dead
        self.last_used = time.monotonic()
        self._busy = 0  # queued and running work items
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, item) -> None:
        with self._busy_lock:
            self._busy += 1
        self.last_used = time.monotonic()
        self._queue.put(item)

    def fail(self, why: str) -> None:
        """(worker thread) the group failed: the pair is dead; tell the owner."""
        if self.error is None:
            self.error = why
            self._on_error()

    def close(self) -> None:
        self._queue.put(None)

    def join(self, timeout_s: float) -> None:
        """Wait (bounded) for the thread to end after `close`. A group still alive when the
        process exits aborts it in gloo's teardown ("terminate called without an active
        exception"), so an owner that closes for good waits here."""
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self.group = self._connect()
        except Exception as e:  # rendezvous timed out or the peer vanished
            self.fail(f"payload channel setup failed: {e}")
        while (item := self._queue.get()) is not None:
            try:
                self._work(self, item)
            finally:
                with self._busy_lock:
                    self._busy -= 1
        self.group = None  # destroyed here, not by the interpreter's teardown
