"""The embedded Redis does not outlive an owner killed outright: a process that started it
from its main thread is SIGKILLed (as a crashed or OOM-killed `pdserve serve` is), and
redis-server ends within seconds instead of holding its port and memory forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OWNER = """
import sys, time
from pdserve.deploy.redis_server import RedisServer
server = RedisServer()
print(server.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie left to its new parent to reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_redis_ends_when_its_owner_is_killed_outright():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    redis_pid = 0
    try:
        redis_pid = int(owner.stdout.readline())
        assert _alive(redis_pid)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        end = time.monotonic() + 10
        while _alive(redis_pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(redis_pid), "redis-server outlived its owner"
    finally:
        owner.kill()
        owner.wait()
        if redis_pid and _alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
