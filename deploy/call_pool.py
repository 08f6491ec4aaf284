"""The threads that make one worker handle's blocking calls (a `deploy.local` proxy or a
worker object): a small pool per worker, so a worker that stops answering holds at most
`size` threads of this process, and calls to every other worker, and everything else that
runs in asyncio's default executor, go on as before.

Life of a pool: threads start on demand, up to `size`; one that had no call for `idle_s`
exits, except the last `keep`: a thread's first call to a `deploy.local` proxy opens its own
connection to the worker's process (tens of ms), which a server idle for a minute should not
pay again on its next request. They are daemon threads: a call stuck on a worker that
never answers again must not keep the process from exiting (ThreadPoolExecutor joins its
threads at exit). Calls past the first `size` wait their turn in arrival order; a waiting
call whose Future is cancelled is skipped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class CallPool:
    def __init__(self, name: str, size: int = 8, idle_s: float = 60.0, keep: int = 1):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0 <= keep <= size:
            raise ValueError(f"keep must be in [0, size], got {keep}")
        self._name, self._size, self._idle_s, self._keep = name, size, idle_s, keep
        self._calls: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple]] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a call
        self._pending = 0  # calls queued and not yet taken by a thread

    @property
    def num_threads(self) -> int:
        return self._threads

    @property
    def num_idle(self) -> int:
        """Threads waiting for a call: the next calls up to this many start at once."""
        return self._idle

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` on a thread of the pool; its result or exception in a Future."""
        future: Future = Future()
        with self._lock:
            self._calls.put((future, fn, args))
            self._pending += 1
            if self._pending > self._idle and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._run, daemon=True,
                                 name=f"{self._name}-call-{self._threads}").start()
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                future, fn, args = self._calls.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # under the lock: no call can slip in unseen
                    if self._pending == 0 and self._threads > self._keep:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller gets it
                future.set_exception(e)
