"""The pieces of worker restarts and health alone: the restart budget's window, the policy's
checks, the health each set of live roles gives, and a Ray actor's exit on a broken loop."""

from __future__ import annotations

import threading

import pytest

from pdserve.deploy.supervisor import RestartBudget, RestartPolicy
from pdserve.protocol import WorkerRole
from pdserve.router.health import serving

P, D, C = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED
SERVICE = "pdserve.v1.PdServe"


def test_the_budget_allows_n_restarts_within_any_window():
    now = [0.0]
    budget = RestartBudget(RestartPolicy(max_restarts=2, window_s=10.0), clock=lambda: now[0])
    assert budget.take()
    now[0] = 5.0
    assert budget.take()
    now[0] = 9.9
    assert not budget.take()  # two within the last 10 s already
    now[0] = 10.0
    assert budget.take()  # the first one left the window
    assert not budget.take()
    now[0] = 30.0
    assert budget.take() and budget.take() and not budget.take()


def test_no_restarts_means_none():
    assert not RestartBudget(RestartPolicy(max_restarts=0)).take()


@pytest.mark.parametrize("bad", [dict(max_restarts=-1), dict(window_s=0), dict(probe_s=-1),
                                 dict(stop_timeout_s=0), dict(backoff_s=0)])
def test_the_policy_refuses_what_cannot_work(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RestartPolicy(**bad)


@pytest.mark.parametrize(("live", "whole", "pools"), [
    ({P, D}, True, {P: True, D: True}),
    ({D}, True, {P: False, D: True}),  # decode workers prefill locally: degraded, serving
    ({P}, False, {P: True, D: False}),  # nothing can decode: every request would fail
    (set(), False, {P: False, D: False}),
])
def test_health_needs_a_worker_that_can_decode(live, whole, pools):
    got = serving(live, SERVICE, (P, D))
    assert got == {"": whole, SERVICE: whole,
                   **{f"{SERVICE}/{role.value}": ok for role, ok in pools.items()}}


def test_a_colocated_worker_can_decode():
    assert serving({C}, SERVICE, (C, D))[""] is True
    assert serving({C}, SERVICE, (C, D))[f"{SERVICE}/decode"] is False


class _Load:
    def __init__(self, error: str):
        self.error = error


class _Worker:
    worker_id = "decode-0"

    def __init__(self, breaks_after: int):
        self.calls = 0
        self._breaks_after = breaks_after

    def load(self):
        self.calls += 1
        return _Load("engine loop stopped: boom" if self.calls > self._breaks_after else "")


def test_a_ray_actor_ends_its_process_once_its_loop_broke():
    from pdserve.deploy.ray_actors import exit_when_broken

    exits: list[int] = []
    worker = _Worker(breaks_after=3)
    exit_when_broken(worker, threading.Event(), 0.001, exit=exits.append)
    assert exits == [1] and worker.calls == 4


def test_a_closed_ray_actor_stops_watching():
    from pdserve.deploy.ray_actors import exit_when_broken

    stop = threading.Event()
    stop.set()
    exits: list[int] = []
    exit_when_broken(_Worker(breaks_after=0), stop, 0.001, exit=exits.append)
    assert exits == []
