"""A bench's helper process (a KV receiver, a raw ZMQ peer) spawned clean and driven over a
pipe: what `bench.kvtransfer`, `bench.kv_overlap` and the cost profile's transfer points
start.

The pipe's child end is closed in this process once the child has started, so a child
that dies (a crash, or a script without a `__main__` guard that spawn re-runs) ends the
wait for its answer with an error naming its exit code, instead of a read that never
returns.

Lifecycle: `Child(target, *args)` starts `target(conn, *args)`; `ask(msg)` / `recv()` talk
to it; `stop(msg)` sends the last message (best effort: it may be gone) and joins it.
"""

from __future__ import annotations

import multiprocessing

mp = multiprocessing.get_context("spawn")  # children start clean: no ZMQ context or threads


class ChildDied(RuntimeError):
    pass


class Child:
    def __init__(self, target, *args):
        self.conn, theirs = mp.Pipe()
        self.process = mp.Process(target=target, args=(theirs, *args), daemon=True)
        self.process.start()
        theirs.close()  # this process's copy: the child's death must reach `recv`

    def recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise ChildDied(f"the bench's {self.process.name} exited (code "
                            f"{self.process.exitcode}) before answering") from None

    def ask(self, msg):
        self.conn.send(msg)
        return self.recv()

    def stop(self, msg=None, timeout_s: float = 30.0) -> None:
        try:
            self.conn.send(msg)
        except OSError:  # gone already
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
