"""A router's token-stream endpoint in a process of its own (a ZMQ PULL socket that drains
what workers push, as router.stream binds one), to kill as a router process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_SINK = """
import sys, zmq
sock = zmq.Context.instance().socket(zmq.PULL)
sock.bind(sys.argv[1])
print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    sock.recv()
"""


class RouterProcess:
    """Bound at `bind` (by default a free port; or the port a dead one had) until `kill()`,
    which is SIGKILL."""

    def __init__(self, bind: str = "tcp://127.0.0.1:*"):
        self.proc = subprocess.Popen([sys.executable, "-c", _SINK, bind],
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        assert self.endpoint.startswith("tcp://"), (self.endpoint, self.proc.poll())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdout.close()
