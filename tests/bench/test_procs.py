"""Reading a deployment's processes from /proc (tree, RSS, listening ports, names), and the
arithmetic of what a cluster still holds after a run (bench.cluster)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from pdserve.bench import procs
from pdserve.bench.cluster import Held, IdleCheck, held
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")

# a child that listens on a port it prints, then lives until killed
LISTENER = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)")


def test_rss_of_this_process_and_none_for_a_process_that_is_gone():
    assert procs.rss_bytes(os.getpid()) > 10 * 1024 * 1024
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert procs.rss_bytes(child.pid) is None


def test_listening_ports_of_this_process():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert s.getsockname()[1] in procs.listening_ports(os.getpid())
    finally:
        s.close()
    assert procs.endpoint_port("tcp://127.0.0.1:5555") == 5555
    assert procs.endpoint_port("") is None and procs.endpoint_port("ipc:///tmp/x") is None


def test_processes_are_named_by_the_kv_port_they_listen_on_or_by_elimination():
    listener = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE,
                                text=True)
    # stands for a spawned worker that receives no KV (a prefill worker)
    spawned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "spawn_main"])
    try:
        port = int(listener.stdout.readline())
        assert {listener.pid, spawned.pid} <= set(procs.descendants(os.getpid()))
        workers = [("decode-0", "decode", f"tcp://127.0.0.1:{port}"),
                   ("prefill-0", "prefill", "")]
        deadline = time.monotonic() + 5
        names = procs.name_processes(os.getpid(), workers)
        while names.get(spawned.pid) is None and time.monotonic() < deadline:
            names = procs.name_processes(os.getpid(), workers)  # the child may still exec
        assert names[os.getpid()] == "router"
        assert names[listener.pid] == "decode-0"
        assert names[spawned.pid] == "prefill-0"
        rss = procs.rss_of(names)
        assert rss["decode-0"] > 0 and rss["router"] > rss["decode-0"] / 10
    finally:
        for p in (listener, spawned):
            p.kill()
            p.wait()


def test_what_a_cluster_holds_after_a_run():
    status = [pb.WorkerStatus(worker_id="d", role="decode", total_blocks=100, free_blocks=97,
                              kv_endpoint="tcp://h:1"),
              pb.WorkerStatus(worker_id="p", role="prefill", total_blocks=100, free_blocks=100,
                              queued_prefill_tokens=5)]
    d, p = held(status)
    assert d.used_blocks == 3 and not d.idle
    assert p.used_blocks == 0 and not p.idle  # queued work is not idle either
    assert Held("x", "decode", "", 0, 0, 0, 0, 0).idle
    check = IdleCheck(False, 30.0, (d, p))
    assert check.leaked_blocks == 3
    assert check.as_dict()["workers"][0]["worker_id"] == "d"
