"""A worker process (deploy.local) stops itself only when the process that started it has
gone: its lifeline reads the parent's sentinel, a pipe whose write end the parent holds,
and a stray close of that descriptor in a live parent must not take a healthy worker down
(its next call would find the process gone, with nothing in any log)."""

from __future__ import annotations

import os
import time

from worker_procs import worker_config

from pdserve.deploy.local import WorkerProcess
from pdserve.protocol import WorkerRole


def test_a_closed_sentinel_in_a_live_parent_leaves_the_worker_serving(tiny_llama_dir):
    proc = WorkerProcess(worker_config(WorkerRole.DECODE, tiny_llama_dir, "sentinel"),
                         num_threads=1)
    try:
        # the write end of the child's sentinel (multiprocessing closes it with the Process
        # object), replaced by /dev/null: the pipe's end closes, the number stays taken
        sentinel_w = proc.process._popen.finalizer._args[-1]
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sentinel_w)
        os.close(null)
        time.sleep(1.0)  # the lifeline wakes at once on the closed pipe
        assert proc.is_alive()
        assert proc.worker.load().engine.num_free_blocks > 0
    finally:
        proc.stop()
        assert not proc.is_alive()
