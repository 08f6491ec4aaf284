"""`pdserve serve --adaptive 2 --no-ray` as users run it: two adaptive workers (one prefill,
one decode), the router's controller elected, a switch the controller orders carried out
by the worker (drain, then the new role in the same process), requests served before and
after with the same answer, and `pdserve status` and /metrics showing roles and switches."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import wait_for

from pdserve.deploy.redis_server import RedisServer
from pdserve.protocol import WorkerRecord
from pdserve.router.controller.store import (
    FENCED_SWITCH,
    LEASE,
    SWITCH_TOTALS,
    SWITCHES,
    SwitchEntry,
    target_key,
    totals_field,
)
from pdserve.router.registry import sync_client, worker_key

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "pdserve"]


def _generate(address: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "generate", "--target", address, "--max-tokens", "8",
                           "--disaggregation", "always", "The capital of France is"],
                          capture_output=True, text=True, timeout=120)


def _record(client, worker_id: str) -> WorkerRecord | None:
    raw = client.hgetall(worker_key(worker_id))
    return WorkerRecord.from_fields(raw) if raw else None


def test_serve_adaptive_switches_a_worker_and_status_shows_it():
    redis_server = RedisServer()
    client = sync_client(redis_server.url)
    server = subprocess.Popen([*CLI, "serve", "--adaptive", "2", "--prefill", "0",
                               "--decode", "0", "--no-ray", "--port", "0", "--http-port", "0",
                               "--redis-url", redis_server.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), server.stderr.read()
        url = server.stdout.readline().strip()
        before = _generate(address)
        assert before.returncode == 0, before.stderr
        assert "prefill adaptive-0 -> decode adaptive-1" in before.stderr  # 1 prefill, 1 decode
        lease = wait_for(lambda: client.get(LEASE), 30, "a controller to be elected").decode()
        epoch = int(lease.rpartition(":")[2])
        # what the elected controller writes when it moves a worker (fenced by its lease)
        entry = SwitchEntry(time.time(), "adaptive-0", "prefill", "colocated", "test", epoch)
        assert client.eval(FENCED_SWITCH, 4, LEASE, target_key("adaptive-0"), SWITCHES,
                           SWITCH_TOTALS, lease, "colocated", epoch, "test", entry.time,
                           entry.to_json(), 100, totals_field("prefill", "colocated")) == 1
        wait_for(lambda: (r := _record(client, "adaptive-0")) and r.role.value == "colocated"
                 and r.serving, 60, "adaptive-0 to serve as colocated")
        started = _record(client, "adaptive-0").started
        after = _generate(address)
        assert after.returncode == 0, after.stderr
        assert after.stdout == before.stdout  # greedy: the same answer from the new layout
        assert "local on" in after.stderr  # no prefill worker left: prefilled where decoded
        assert _record(client, "adaptive-0").started == started  # the same process

        status = subprocess.run([*CLI, "status", "--target", address], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert any(line.startswith("adaptive-0") and "colocated*" in line and "serving" in line
                   for line in lines), status.stdout
        assert any(line.startswith("adaptive-1") and "decode*" in line for line in lines)
        assert "role switches: 1" in status.stdout
        assert "adaptive-0" in status.stdout and "prefill -> colocated" in status.stdout
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert ('pdserve:role_switches_total{from_role="prefill",to_role="colocated"} 1.0'
                in metrics)
        assert 'pdserve:num_adaptive_workers{role="colocated",state="serving"} 1.0' in metrics
        assert "pdserve:controller_leader 1.0" in metrics
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        assert "switched role prefill -> colocated" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
        client.close()
        redis_server.stop()


def test_serve_help_explains_adaptive():
    out = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert "--adaptive N" in out.stdout and "controller" in out.stdout
