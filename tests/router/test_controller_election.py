"""The controller's election and its writes on a real Redis (the embedded server): one of
two controllers acts; when the holder stops renewing, the other takes over after the
lease with the next epoch; a stale holder's writes are fenced off in Redis; the switch
log stays bounded; the routers' signals are summed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
import redis.asyncio

from pdserve.deploy.redis_server import RedisServer
from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.controller.decide import ControllerConfig, RouterSignals
from pdserve.router.controller.loop import Controller
from pdserve.router.controller.store import (
    FENCED_SWITCH,
    LEASE,
    SWITCH_TOTALS,
    SWITCHES,
    read_signals,
    read_switches,
    read_target,
    target_key,
)
from pdserve.router.registry import sync_client
from pdserve.router.view import LiveWorker

CONFIG = ControllerConfig(interval_s=0.05, lease_ttl_s=0.5, dwell_s=1, cooldown_s=0.01,
                          batch_cap=10, history=3)


@pytest.fixture(scope="module")
def server():
    s = RedisServer()
    yield s
    s.stop()


@pytest.fixture()
def url(server):
    c = sync_client(server.url)
    c.flushall()
    c.close()
    return server.url


@dataclass
class FakeView:
    workers: dict


@dataclass
class FakeQueue:
    queued: int = 0
    queued_tokens: int = 0


def record(wid, role, adaptive=True, queued=0):
    now = time.time()
    return WorkerRecord(wid, role, "node", "", 16, 100, 100, 0, 0, queued, now, now,
                        prefill_tokens_per_s=100.0, adaptive=adaptive, role_since=now - 60)


def busy_prefill_view() -> FakeView:
    """Prefill queues long, decode idle: the rule moves an adaptive decode worker."""
    records = [record("p0", WorkerRole.PREFILL, adaptive=False, queued=900),
               record("d0", WorkerRole.DECODE, adaptive=False),
               record("a0", WorkerRole.DECODE)]
    return FakeView({r.worker_id: LiveWorker(r, None) for r in records})


def run(coro):
    return asyncio.run(coro)


async def _until(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def test_one_controller_acts_and_the_other_takes_over_when_it_stops(url):
    async def scenario():
        ca, cb = redis.asyncio.Redis.from_url(url), redis.asyncio.Redis.from_url(url)
        view = busy_prefill_view()
        a = Controller(CONFIG, "router-a", ca, view, FakeQueue())
        b = Controller(CONFIG, "router-b", cb, view, FakeQueue())
        try:
            decided = await a.turn()
            assert decided is not None and [m.worker_id for m in decided.moves] == ["a0"]
            assert await b.turn() is None  # a holds the lease: b only watches
            assert a.leads and not b.leads
            assert b.holder == ("router-a", 1)
            (entry,) = b.switches
            assert (entry.worker, entry.from_role, entry.to_role, entry.epoch) == (
                "a0", "decode", "prefill", 1)
            assert b.totals == {("decode", "prefill"): 1}
            # a stops renewing (its process paused or died): b takes over after the lease
            await _until(b.turn, 10, "b to take the lease")
            assert b.leads and b.election.epoch == 2
            # a's lease value is stale: whatever its clock says, its writes are fenced
            stale = await ca.eval(FENCED_SWITCH, 4, LEASE, target_key("a0"), SWITCHES,
                                  SWITCH_TOTALS, a.election.lease_value, "decode",
                                  a.election.epoch, "stale", time.time(), "{}", 3,
                                  "prefill>decode")
            assert stale == 0
            target = read_target(sync_client(url), "a0")
            assert (target.role, target.epoch) == (WorkerRole.PREFILL, 1)
            # a comes back: it finds the lease another's and follows
            assert await a.turn() is None and not a.leads
            await b.close()  # an orderly stop resigns: a takes over at once
            assert await a.turn() is not None and a.election.epoch == 3
        finally:
            await a.close()
            await ca.aclose()
            await cb.aclose()

    run(scenario())


def test_the_switch_log_is_bounded_and_newest_first(url):
    async def scenario():
        client = redis.asyncio.Redis.from_url(url)
        c = Controller(CONFIG, "router-a", client, FakeView({}), FakeQueue())
        try:
            assert await c.election.campaign()
            for i in range(5):
                assert await client.eval(
                    FENCED_SWITCH, 4, LEASE, target_key(f"w{i}"), SWITCHES, SWITCH_TOTALS,
                    c.election.lease_value, "prefill", c.election.epoch, f"r{i}", float(i),
                    f'{{"time": {i}, "worker": "w{i}", "from_role": "decode", '
                    f'"to_role": "prefill", "reason": "r{i}", "epoch": 1}}', CONFIG.history,
                    "decode>prefill") == 1
            switches = await read_switches(client)
            assert [e.worker for e in switches] == ["w4", "w3", "w2"]
        finally:
            await c.close()
            await client.aclose()

    run(scenario())


def test_the_routers_signals_are_summed(url):
    async def scenario():
        client = redis.asyncio.Redis.from_url(url)
        a = Controller(CONFIG, "router-a", client, FakeView({}), FakeQueue(2, 300))
        b = Controller(CONFIG, "router-b", client, FakeView({}), FakeQueue(1, 50))
        try:
            await a.turn()
            await b.turn()
            signals = await read_signals(client)
            assert signals == RouterSignals(queued=3, queued_tokens=350)
        finally:
            await a.close()
            await b.close()
            await client.aclose()

    run(scenario())
