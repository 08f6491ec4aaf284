"""Admission at the door (router.admission): the queue-token estimate, the refusal, and the
router's use of both: the requests of one burst see each other before any load report."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.protocol import SamplingParams, WorkerRecord, WorkerRole
from pdserve.router.admission import Backlog, estimate_wait_s, refusal
from pdserve.router.errors import RequestError
from pdserve.router.policy import Hint
from pdserve.router.router import Router, RouterConfig
from pdserve.router.validate import ValidRequest
from pdserve.router.view import LiveWorker


def test_the_wait_is_the_best_workers_queue_plus_the_routers_own():
    a, b = Backlog("a", 1000, 500.0), Backlog("b", 0, 100.0)
    # a: (1000 + 500) / 500 = 3 s; b: 500 / 100 = 5 s; the router's 600 tokens over 600/s
    assert estimate_wait_s([a, b], 500, 0) == pytest.approx(3.0)
    assert estimate_wait_s([a, b], 500, 600) == pytest.approx(4.0)


def test_no_estimate_without_a_candidate_or_a_measured_rate():
    assert estimate_wait_s([], 10, 0) is None
    assert estimate_wait_s([Backlog("a", 0, 100.0), Backlog("b", 0, 0.0)], 10, 0) is None


def test_refusal_names_the_wait_and_the_slo():
    assert refusal(None, 1.0) is None
    assert refusal(5.0, None) is None and refusal(5.0, 0.0) is None  # no bound
    assert refusal(0.9, 1.0) is None
    why = refusal(12.34, 5.0)
    assert "~12.3 s" in why and "TTFT SLO of 5.0 s" in why


def _worker(wid: str, role: WorkerRole, queued: int, rate: float) -> LiveWorker:
    record = WorkerRecord(wid, role, "n", "", 16, 100, 100, 0, 0, queued, time.time(), 1.0,
                          rate)
    return LiveWorker(record, handle=None)


def _request(n: int, slo_ttft_ms: float | None = None) -> ValidRequest:
    return ValidRequest("", tuple(range(1, n + 1)), SamplingParams(max_tokens=4), Hint.AUTO,
                        slo_ttft_ms, None)


def _router(default_ttft_slo_s: float, *workers: LiveWorker) -> Router:
    router = Router(RouterConfig(default_ttft_slo_s=default_ttft_slo_s), None, None,
                    lambda record: None)
    router.view.workers = {w.worker_id: w for w in workers}
    return router


def test_the_router_refuses_by_the_requests_slo_or_its_default():
    async def main():
        p = _worker("p", WorkerRole.PREFILL, queued=4000, rate=1000.0)  # 4 s queued
        router = _router(30.0, p, _worker("d", WorkerRole.DECODE, 0, 0.0))
        try:
            router.door.admit(_request(1000), disagg=True)  # ~5 s < the 30 s default
            with pytest.raises(RequestError) as e:
                router.door.admit(_request(1000, slo_ttft_ms=2000), disagg=True)
            assert e.value.code == "RESOURCE_EXHAUSTED" and "refused at admission" in str(e.value)
            # not disaggregated: the decode worker prefills, and it has measured nothing yet
            router.door.admit(_request(1000, slo_ttft_ms=1), disagg=False)
            off = _router(0.0, p)
            off.door.admit(_request(100_000), disagg=True)  # admission by queued work is off
            await off.stream.close()
        finally:
            await router.stream.close()

    asyncio.run(main())


def test_a_burst_counts_what_this_router_sent_since_the_last_report():
    """The load report lags a heartbeat: the prompts this router already sent count."""
    async def main():
        p = _worker("p", WorkerRole.PREFILL, queued=0, rate=1000.0)
        router = _router(3.0, p)
        try:
            for i in range(2):  # 2 x 1000 tokens dispatched, none reported yet
                router.ledger.started(p.worker_id, f"t{i}", 1000)
            router.door.admit(_request(900), disagg=True)  # (2000 + 900) / 1000 = 2.9 s
            with pytest.raises(RequestError):
                router.door.admit(_request(1100), disagg=True)  # 3.1 s
            router.ledger.ended("t0")  # its first token came: no longer ahead of anyone
            router.door.admit(_request(1100), disagg=True)
        finally:
            await router.stream.close()

    asyncio.run(main())


def test_slots_that_free_slowly_add_the_router_queues_wait():
    from pdserve.router.admission import SlotRate, slot_wait_s

    slots = SlotRate(window_s=10.0, min_samples=4)
    for t in range(3):
        slots.released(queue_waiting=True, now=100.0 + t)
    slots.released(queue_waiting=False, now=103.0)  # nobody waited: says nothing
    assert slots.per_s(now=103.0) is None  # three samples: too few to tell
    slots.released(queue_waiting=True, now=104.0)
    assert slots.per_s(now=104.0) == pytest.approx(4 / 4.0)  # 4 releases over 4 s
    assert slot_wait_s(10, slots.per_s(now=104.0)) == pytest.approx(10.0)
    assert slots.per_s(now=200.0) is None  # the window moved past them
    assert slot_wait_s(0, 1.0) == 0.0 and slot_wait_s(5, None) == 0.0


def test_the_router_adds_the_slot_wait_to_the_prefill_estimate():
    async def main():
        p = _worker("p", WorkerRole.PREFILL, queued=0, rate=1000.0)
        router = _router(3.0, p)
        try:
            router.door.admit(_request(100), disagg=True)  # 0.1 s of prefill, no queue
            router.queue.queued = 20  # twenty requests wait for a slot; slots free at 5/s
            for t in range(5):
                router.door.slots.released(True, now=time.monotonic() - 1.0 + t * 0.2)
            with pytest.raises(RequestError) as e:
                router.door.admit(_request(100), disagg=True)  # 0.1 s + 20 / ~5 per s
            assert "first token" in str(e.value)
        finally:
            router.queue.queued = 0
            await router.stream.close()

    asyncio.run(main())


def test_the_router_queue_serves_its_waiters_in_arrival_order():
    """One slot frees at a time: each goes to the oldest waiter, not to whoever wakes first."""
    from pdserve.router.view import LiveWorker

    async def main():
        d = _worker("d", WorkerRole.DECODE, 0, 0.0)
        router = Router(RouterConfig(max_in_flight_per_worker=1, default_ttft_slo_s=0.0,
                                     refresh_s=30.0),  # no timed look: only notifies wake
                        None, None, lambda record: None)
        router.view.workers = {d.worker_id: d}
        served: list[int] = []
        d.in_flight["busy"] = asyncio.Queue()  # the only slot is taken

        async def waiter(i: int):
            decode, _ = await router.queue.wait(_request(10), False, set())
            assert isinstance(decode, LiveWorker)
            served.append(i)
            decode.in_flight[f"t{i}"] = asyncio.Queue()  # holds the slot, as dispatch does

        try:
            tasks = []
            for i in range(5):
                tasks.append(asyncio.create_task(waiter(i)))
                await asyncio.sleep(0)  # arrive in order
            for i, _ in enumerate(tasks):
                freed = "busy" if i == 0 else f"t{i - 1}"
                d.in_flight.pop(freed)
                await router.view.notify()
                await asyncio.wait_for(asyncio.shield(tasks[i]), 5)
            assert served == [0, 1, 2, 3, 4]
        finally:
            await router.stream.close()

    asyncio.run(main())


def test_a_burst_of_prefill_choices_spreads_before_any_load_report():
    """Both prefill workers last reported empty queues; the prompts this router sent one
    since count, so the next goes to the other (it used to pile onto the first)."""
    from pdserve.deploy.redis_server import RedisServer
    from pdserve.router.registry import async_client

    server = RedisServer()

    async def main():
        p0 = _worker("p0", WorkerRole.PREFILL, queued=0, rate=1000.0)
        p1 = _worker("p1", WorkerRole.PREFILL, queued=0, rate=1000.0)
        d = _worker("d", WorkerRole.DECODE, queued=0, rate=0.0)
        router = Router(RouterConfig(), None, async_client(server.url), lambda record: None)
        router.view.workers = {w.worker_id: w for w in (p0, p1, d)}
        try:
            chosen = []
            for i in range(4):
                _, prefill = await router.queue.wait(_request(500), True, set())
                router.ledger.started(prefill.worker_id, f"t{i}", 500)
                chosen.append(prefill.worker_id)
            assert chosen == ["p0", "p1", "p0", "p1"]
        finally:
            await router.stream.close()
            await router.redis.aclose()

    try:
        asyncio.run(main())
    finally:
        server.stop()
