"""A worker process (deploy.local) stops itself only when the process that started it has
gone: its lifeline reads the parent's sentinel, a pipe whose write end the parent holds,
and a stray close of that descriptor in a live parent must not take a healthy worker down
(its next call would find the process gone, with nothing in any log).

Each worker process listens at an address of its own: multiprocessing keeps a thread's
connection per server address, so a worker listening where a dead one had would be called
over the dead one's connection."""

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


def test_a_worker_started_after_one_was_killed_listens_elsewhere_and_answers(tiny_llama_dir):
    config = worker_config(WorkerRole.DECODE, tiny_llama_dir, "reborn")
    first = WorkerProcess(config, num_threads=1)
    try:
        assert first.worker.load().engine.num_free_blocks > 0  # this thread's connection
    finally:
        first.kill()
    assert not os.path.exists(first.address)  # its socket's directory went with it
    second = WorkerProcess(config, num_threads=1)
    try:
        assert second.address != first.address
        assert second.worker.load().engine.num_free_blocks > 0
    finally:
        second.stop()
    assert not os.path.exists(os.path.dirname(second.address))


def test_a_start_waits_past_its_timeout_only_while_the_kernels_build(tmp_path, monkeypatch):
    """A worker compiling the CPU kernels on its one core may take minutes: its start is
    awaited while the build's lock is there, and not beyond."""
    import multiprocessing as mp
    import threading

    from pdserve.deploy.local import _await_start
    from pdserve.engine.cpu_kernels import build_dir
    from pdserve.models.registry import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    ours, theirs = mp.Pipe(duplex=False)
    t0 = time.monotonic()
    assert not _await_start(ours, 0.2)  # no build: the timeout holds
    assert time.monotonic() - t0 < 2.0
    build_dir().mkdir(parents=True)
    lock = build_dir() / "lock"
    lock.touch()
    threading.Timer(1.5, theirs.send, args=(("ready", None),)).start()
    assert _await_start(ours, 0.2)  # answered during the build, well past the timeout
    assert ours.recv() == ("ready", None)
    threading.Timer(1.0, lock.unlink).start()
    t0 = time.monotonic()
    assert not _await_start(ours, 0.2)  # the build ended and the worker still said nothing
    assert 1.0 <= time.monotonic() - t0 < 4.0


def test_a_long_tmpdir_still_gives_a_socket_address_that_fits(tmp_path, monkeypatch):
    import tempfile

    from pdserve.deploy.local import _socket_dir

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = _socket_dir()
    try:
        assert len(os.path.join(folder, "manager.sock")) < 104
        assert os.path.isdir(folder) and not list(deep.iterdir())  # the long one was removed
    finally:
        os.rmdir(folder)
