"""One dispatch (router.dispatch): a dispatched prompt is ahead of the next placement from
the moment its workers are picked, and every way a dispatch fails before it returns gives
back what it took (slots, ledger entry) and aborts what it ordered."""

from __future__ import annotations

import asyncio

import pytest
from placement_helpers import request, router_of, worker

from pdserve.protocol import Reservation, WorkerRole, WorkerState
from pdserve.router.errors import RequestError
from pdserve.router.handles import NoRoom, NotServing
from pdserve.router.placement import Route, Slo
from pdserve.router.policy import Hint


class Decode:
    """A decode worker's handle: `reserve` waits for `release`, then answers `answer`."""

    def __init__(self, answer=None):
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.answer = answer if answer is not None else Reservation("tcp://d:1")
        self.aborted: list[str] = []

    async def reserve(self, order):
        self.entered.set()
        await self.release.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def abort(self, tid):
        self.aborted.append(tid)


class Prefill:
    def __init__(self, refuse: Exception | None = None):
        self.refuse = refuse
        self.aborted: list[str] = []

    async def submit(self, order):
        if self.refuse is not None:
            raise self.refuse
        return False

    async def abort(self, tid):
        self.aborted.append(tid)


def _cluster(decode: Decode, prefill: Prefill):
    p, d = worker("p", WorkerRole.PREFILL), worker("d", WorkerRole.DECODE)
    p.handle, d.handle = prefill, decode
    return router_of(p, d), p, d


def _dispatch(router, n: int = 1000):
    route = Route(None, {}, Slo(30.0, None), 0.0, True)
    return asyncio.create_task(router.dispatcher.dispatch(
        request(n, hint=Hint.ALWAYS), "t1", True, asyncio.Queue(), None, set(), None, [],
        route, False))


def test_a_dispatched_prompt_is_ahead_of_the_next_placement_before_its_orders_are_answered():
    """A burst's second request is placed while the first's reserve is on the wire: it
    must already see the first prompt queued on the prefill worker (and its slot taken)."""
    async def main():
        decode, prefill = Decode(), Prefill()
        router, p, d = _cluster(decode, prefill)
        try:
            ask = request(500, slo_ttft_ms=30_000, hint=Hint.ALWAYS)
            alone = router.door.place(ask, {})
            task = _dispatch(router)
            await asyncio.wait_for(decode.entered.wait(), 5)
            assert router.ledger.tokens("p") == 1000 and "t1" in p.in_flight
            behind = router.door.place(ask, {})
            assert behind.ttft_s - alone.ttft_s == pytest.approx(1.0, rel=0.05)  # 1 ms/token
            task.cancel()  # the request goes away mid-reserve: nothing of it is left
            with pytest.raises(asyncio.CancelledError):
                await task
            assert router.ledger.tokens("p") == 0 and not p.in_flight and not d.in_flight
            assert (decode.aborted, prefill.aborted) == (["t1"], ["t1"])
        finally:
            await router.stream.close()
    asyncio.run(main())


def test_a_prefill_worker_that_refuses_after_the_reservation_frees_it_and_ends_the_dispatch():
    """The prefill worker began a role switch the view had not seen: the decode worker's
    reservation under this transfer id is aborted, nothing stays held, and the request is
    failed as retryable (its next dispatch has a new transfer id)."""
    async def main():
        decode, prefill = Decode(), Prefill(refuse=NotServing("worker p is draining"))
        decode.release.set()
        router, p, d = _cluster(decode, prefill)
        try:
            with pytest.raises(RequestError) as e:
                await asyncio.wait_for(_dispatch(router), 5)
            assert e.value.code == "UNAVAILABLE" and e.value.retryable
            assert e.value.worker_ids == ("p",)
            assert decode.aborted == ["t1"] and prefill.aborted == []
            assert router.ledger.tokens("p") == 0 and not p.in_flight and not d.in_flight
            assert router.view.workers["p"].record.state is not WorkerState.SERVING
        finally:
            await router.stream.close()
    asyncio.run(main())


def test_a_decode_worker_found_full_is_passed_over_and_nothing_is_held_meanwhile():
    async def main():
        decode, prefill = Decode(answer=NoRoom("no free blocks")), Prefill()
        decode.release.set()
        router, p, d = _cluster(decode, prefill)
        try:
            task = _dispatch(router)
            await asyncio.wait_for(decode.entered.wait(), 5)
            for _ in range(50):  # until it has given back what it took and waits again
                if not p.in_flight:
                    break
                await asyncio.sleep(0.01)
            assert router.ledger.tokens("p") == 0 and not p.in_flight and not d.in_flight
            assert d.record.free_blocks == 0  # seen as full until its next heartbeat
            assert router.queue.queued == 1  # waiting for room like the others
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert router.queue.queued == 0
        finally:
            await router.stream.close()
    asyncio.run(main())
