"""`pdserve serve` as users run it: a subprocess that prints its address, answers
`pdserve generate`, `pdserve status` and HTTP, and leaves no process behind after SIGTERM
or a Ctrl-C to its group (mid-burst), nor a worker after its own death (mid-burst)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from rpc_helpers import greedy_request, stub_for

from pdserve.deploy.redis_server import RedisServer
from pdserve.router.registry import sync_client, worker_key
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    tree, found = {}, set()
    for line in out.splitlines():
        p, pp = map(int, line.split())
        tree.setdefault(pp, []).append(p)
    todo = [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def test_serve_answers_and_leaves_nothing_after_sigterm():
    cli = [sys.executable, "-m", "pdserve"]
    server = subprocess.Popen([*cli, "serve", "--port", "0", "--http-port", "0"],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), server.stderr.read()
        children = _children(server.pid)
        assert len(children) >= 3  # two workers and Redis
        out = subprocess.run([*cli, "generate", "--target", address, "--max-tokens", "8",
                              "The capital of France is"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() and "length" in out.stderr
        status = subprocess.run([*cli, "status", "--target", address], capture_output=True,
                                text=True, timeout=60)
        assert "prefill-0" in status.stdout and "decode-0" in status.stdout
        url = server.stdout.readline().strip()  # the HTTP API, on a port it picked
        body = json.dumps({"model": "smollm2-135m", "prompt": "The capital of France is",
                           "max_tokens": 8}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.load(response)
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == 8
        password = _redis_password(children)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        # the embedded Redis's password is nowhere a user or a log would see it
        seen = server.stderr.read() + out.stdout + out.stderr + status.stdout
        assert "Redis redis://127.0.0.1:" in seen and password not in seen
        assert not (alive := _gone(children, 10)), f"left behind: {alive}"
    finally:
        if server.poll() is None:
            server.kill()


def _redis_password(pids) -> str:
    """From the config file of the redis-server among `pids`; never on its command line."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except FileNotFoundError:
            continue
        if "redis-server" in argv[0]:  # it runs in its data folder, beside its config
            with open(f"/proc/{pid}/cwd/redis.conf") as f:
                (line,) = [x for x in f if x.startswith("requirepass ")]
            password = line.split()[1].strip('"')
            assert len(password) >= 32 and password not in " ".join(argv)
            return password
    raise AssertionError("no redis-server among the children")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                          text=True).stdout.strip()
    return bool(stat) and not stat.startswith("Z")


def _serve_no_ray(redis_url: str) -> tuple[subprocess.Popen, str, set[int]]:
    """`pdserve serve --no-ray` on the test's Redis (to read the registry once the server is
    gone), leading its own process group as a shell's foreground job; once ready: the
    server and its process tree."""
    server = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--no-ray",
                               "--port", "0", "--redis-url", redis_url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    address = server.stdout.readline().strip()
    assert address.startswith("127.0.0.1:"), server.stderr.read()
    children = _children(server.pid)
    assert len(children) >= 2  # two workers
    return server, address, children


def _burst(address: str, n: int = 12) -> list[dict]:
    """`n` requests at once, above what two workers serve together (long prompts queue
    for the prefill worker while the first decode); returns once one streams tokens, while
    the rest are queued, prefilling or decoding. Each outcome gets "code" when its call
    ends."""
    stub = stub_for(address)
    outcomes, streaming = [{} for _ in range(n)], threading.Event()

    def run(i: int) -> None:
        req = greedy_request("word " * (20 + 60 * (i % 4)), 400,
                             disaggregation=pb.DISAGGREGATION_ALWAYS)
        req.sampling.ignore_eos = True
        try:
            for response in stub.Generate(req, timeout=120):
                if response.chunk.token_ids:
                    streaming.set()
            outcomes[i]["code"] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            outcomes[i]["code"] = e.code()

    for i in range(n):
        threading.Thread(target=run, args=(i,), daemon=True).start()
    assert streaming.wait(120), outcomes
    return outcomes


def _ended(outcomes: list[dict], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not all("code" in o for o in outcomes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return all("code" in o for o in outcomes)


def _gone(pids: set[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def test_ctrl_c_to_the_group_mid_burst_stops_everything_in_order(redis_server):
    """A terminal's Ctrl-C signals the whole foreground group, here while a burst is being
    served: the server stops its workers, each unregistering (not left to expire), every
    call ends, and no failure is reported on the way."""
    server, address, children = _serve_no_ray(redis_server.url)
    try:
        client = sync_client(redis_server.url)
        assert len(client.keys(worker_key("*"))) == 2
        outcomes = _burst(address)
        os.killpg(server.pid, signal.SIGINT)
        assert server.wait(60) == 0
        assert client.keys(worker_key("*")) == []
        log = server.stderr.read()
        assert "shutting down" in log
        for sign in ("failed", "could not unregister", "Traceback", "restarted"):
            assert sign not in log, log
        assert not (alive := _gone(children, 10)), f"left behind: {alive}"
        assert _ended(outcomes, 30), outcomes
        # a server going away: each client may retry elsewhere
        assert all(o["code"] == grpc.StatusCode.UNAVAILABLE for o in outcomes), outcomes
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_workers_stop_themselves_when_the_server_is_killed_mid_burst(redis_server):
    """The server dies (SIGKILL) while its workers hold a burst's jobs: each worker ends
    them, unregisters and exits; the clients' calls end."""
    server, address, children = _serve_no_ray(redis_server.url)
    client = sync_client(redis_server.url)
    outcomes = _burst(address)
    server.kill()
    server.wait(10)
    # the workers (and multiprocessing's helper) end
    assert not (alive := _gone(children, 30)), f"left behind: {alive}"
    assert client.keys(worker_key("*")) == []
    assert _ended(outcomes, 30), outcomes
    assert all(o["code"] == grpc.StatusCode.UNAVAILABLE for o in outcomes), outcomes
