"""A worker process that dies under a test is named in the test's report, with how it
ended (tests/worker_procs.dead_workers, reported by conftest's hook); one stopped by the
test is not."""

from __future__ import annotations

import os
import signal

from helpers import wait_for
from worker_procs import dead_workers, spawn, stop_all, worker_config

from pdserve.protocol import WorkerRole


def test_a_killed_worker_is_named_with_its_signal_until_it_is_stopped(tiny_llama_dir):
    victim, bystander = spawn([worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-victim"),
                               worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p-live")])
    try:
        assert dead_workers() == []
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: not victim.is_alive(), 30, "the worker to die")
        assert dead_workers() == [f"worker d-victim (pid {victim.pid}, decode): killed by "
                                  "SIGKILL"]
    finally:
        stop_all([victim, bystander])
    assert dead_workers() == []
