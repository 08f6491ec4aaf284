"""The embedded Redis is locked down: a password nobody sees, protected mode, and no
CONFIG, DEBUG or MODULE for anyone."""

from __future__ import annotations

import os
import stat

import pytest
import redis

from pdserve.deploy.heartbeat import HeartbeatConfig
from pdserve.deploy.redis_server import RedisServer, public_url


@pytest.fixture(scope="module")
def server():
    s = RedisServer()
    yield s
    s.stop()


def test_a_client_without_the_password_is_refused(server):
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        client.ping()
    wrong = redis.Redis(host="127.0.0.1", port=server.port, password="guess", socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    assert redis.Redis.from_url(server.url).ping()


@pytest.mark.parametrize("command", [("CONFIG", "GET", "dir"), ("CONFIG", "SET", "dir", "/"),
                                     ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST")])
def test_config_debug_and_module_are_gone_even_with_the_password(server, command):
    client = redis.Redis.from_url(server.url)
    with pytest.raises(redis.ResponseError, match="unknown command"):
        client.execute_command(*command)


def test_the_password_is_in_no_command_line_repr_or_public_url(server):
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        argv = f.read().decode()
    assert server.password not in argv
    config = os.path.join(os.readlink(f"/proc/{server.pid}/cwd"), "redis.conf")
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert server.password in server.url
    for text in (server.public_url, public_url(server.url), repr(server),
                 repr(HeartbeatConfig(server.url, "node", 16, 0.5, 3.0))):
        assert server.password not in text
    assert public_url(server.url) == server.public_url == f"redis://127.0.0.1:{server.port}/0"


def test_public_url_drops_credentials_and_keeps_the_rest():
    assert public_url("rediss://user:pw@h.example:6380/2") == "rediss://h.example:6380/2"
    assert public_url("redis://:pw@[::1]:6379/0") == "redis://[::1]:6379/0"
    assert public_url("redis://h:1/0") == "redis://h:1/0"
