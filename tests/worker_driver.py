"""Waits the worker tests share: until a worker is idle, its load matches, a job's state."""

from __future__ import annotations

import time


def wait_idle(worker, timeout: float = 10.0) -> None:
    """Until the worker reports all blocks free and no job, or fail with its load."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if worker.load().is_idle:
            return
        time.sleep(0.02)
    raise AssertionError(f"worker not idle after {timeout}s: {worker.load()}")


def wait_load(worker, predicate, timeout: float = 10.0) -> None:
    """Until `predicate(engine stats)` holds in the worker's load report."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate(worker.load().engine):
            return
        time.sleep(0.01)
    raise AssertionError(f"load never matched: {worker.load()}")


def wait_state(worker, transfer_id: str, state, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if worker.job_state(transfer_id) is state:
            return
        time.sleep(0.002)
    raise AssertionError(f"{transfer_id} never reached {state}: {worker.job_state(transfer_id)}")
