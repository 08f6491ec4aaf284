"""A wake-up queue for an I/O thread that sleeps in a ZMQ poller."""

from __future__ import annotations

import os
import queue
import threading


class Mailbox:
    """A queue for an I/O thread that polls `fd`: `put` from any thread wakes the poll."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()  # no write after close: the fd number may be reused
        self._closed = False

    def put(self, item) -> None:
        self._queue.put(item)
        self.wake()

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._write_fd, b"x")
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already

    def take(self) -> list:
        """Everything queued so far; also empties the wake-up pipe."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self._write_fd)
