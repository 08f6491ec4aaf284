"""A queue into an I/O thread that sleeps in a ZMQ poller, woken only when it sleeps.

Lifecycle: the owner creates it, registers `fd` in its poller, and from then on sleeps only
through `poll`. Any thread `put`s; the owner `take`s everything queued at once (a step's
commands come out as one batch). `close` after the owner's thread has stopped.

Why not write the wake-up pipe on every `put`: the prefill queues one command per layer from
its compute thread, and each pipe write is a syscall plus a wake-up of a thread that is
often already awake. A `put` writes only when the owner is inside `poll` and nobody has
signalled it yet. The owner marks itself asleep before it looks at the queue one last time,
and a putter appends before it looks at the mark, so one of the two always sees the other:
no item waits out a poll timeout.
"""

from __future__ import annotations

import collections
import os
import threading

import zmq


class Mailbox:
    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()  # append/popleft: thread-safe
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._sleeping = False  # the owner is in (or about to enter) poll
        self._signalled = False  # a wake-up byte was written since the owner last woke
        self._lock = threading.Lock()  # no write after close: the fd number may be reused
        self._closed = False

    def put(self, item, wake: bool = True) -> None:
        """Queue `item`; with `wake`, wake the owner if it sleeps (else it finds the item
        when it next wakes)."""
        self._items.append(item)
        if wake and self._sleeping and not self._signalled:
            self.wake()

    def wake(self) -> None:
        """Make the owner's current or next `poll` return at once (any thread)."""
        with self._lock:
            if self._closed:
                return
            self._signalled = True
            try:
                os.write(self._write_fd, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    def take(self) -> list:
        """Everything queued so far, in order (owner only)."""
        items = self._items
        return [items.popleft() for _ in range(len(items))]

    def poll(self, poller: zmq.Poller, timeout_ms: int) -> dict:
        """Sleep in `poller` (which holds `fd`) until a socket is ready, a put or a wake
        comes, or `timeout_ms`; the ready sockets (owner only)."""
        self._sleeping = True
        try:
            ready = dict(poller.poll(0 if self._items else timeout_ms))
        finally:
            self._sleeping = False
        if self.fd in ready:
            try:
                while os.read(self.fd, 4096):
                    pass
            except BlockingIOError:
                pass
            # After draining, not before: a wake that sets the flag after this point writes
            # after the drain too, so a set flag always has its byte in the pipe.
            self._signalled = False
        return ready

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self._write_fd)
