"""A router's token-stream endpoint in a process of its own (a ZMQ ROUTER socket that drains
what workers send, as router.stream binds one), to kill as a router process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# binds where the first line of its stdin says, prints the endpoint, drains forever; a
# stdin closed before any address came (the test ended first) ends it quietly
_SINK = """
import sys, zmq
address = sys.stdin.readline().strip()
if not address:
    sys.exit(0)
sock = zmq.Context.instance().socket(zmq.ROUTER)
sock.bind(address)
print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    sock.recv()
"""


class RouterProcess:
    """Bound at `bind` (a free port by default) until `kill()`, which is SIGKILL. With
    `bind` None the process starts and waits: `bind_at` then binds at once (e.g. the port
    of a router just killed, within a grace period)."""

    def __init__(self, bind: str | None = "tcp://127.0.0.1:*"):
        self.proc = subprocess.Popen([sys.executable, "-c", _SINK], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = ""
        if bind is not None:
            self.bind_at(bind)

    def bind_at(self, address: str) -> None:
        self.proc.stdin.write(address + "\n")
        self.proc.stdin.flush()
        self.endpoint = self.proc.stdout.readline().strip()
        assert self.endpoint.startswith("tcp://"), (self.endpoint, self.proc.poll())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()
