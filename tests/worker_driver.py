"""Waits the worker tests share: until a worker is idle, its load matches, a job's state."""

from __future__ import annotations

from helpers import wait_for


def wait_idle(worker, timeout: float = 10.0) -> None:
    """Until the worker reports all blocks free and no job, or fail with its load."""
    try:
        wait_for(lambda: worker.load().is_idle, timeout, "the worker to be idle")
    except AssertionError:
        raise AssertionError(f"worker not idle after {timeout}s: {worker.load()}") from None


def wait_load(worker, predicate, timeout: float = 10.0) -> None:
    """Until `predicate(engine stats)` holds in the worker's load report."""
    try:
        wait_for(lambda: predicate(worker.load().engine), timeout, "the load")
    except AssertionError:
        raise AssertionError(f"load never matched: {worker.load()}") from None


def wait_state(worker, transfer_id: str, state, timeout: float = 30.0) -> None:
    try:
        wait_for(lambda: worker.job_state(transfer_id) is state, timeout, str(state),
                 poll_s=0.002)
    except AssertionError:
        raise AssertionError(f"{transfer_id} never reached {state}: "
                             f"{worker.job_state(transfer_id)}") from None
