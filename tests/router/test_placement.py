"""The router with a cost profile: admission refuses by predicted TTFT and names the
prediction, the hint still binds, a burst's requests see each other (the ledger), and the
router queue orders its waiters by deadline."""

from __future__ import annotations

import asyncio
import time

import pytest
from placement_helpers import request as _request
from placement_helpers import router_of as _router
from placement_helpers import worker as _worker

from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.errors import RequestError
from pdserve.router.observe import Shortage
from pdserve.router.policy import Hint


def test_admission_refuses_by_predicted_ttft_and_names_it():
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL, queued=3000),
                         _worker("d", WorkerRole.DECODE, running=4))
        # the decode worker prefills it sooner than the prefill worker's queue would
        placed = router.door.place(_request(500, slo_ttft_ms=10_000), {})
        assert not placed.disaggregated and placed.placement.decode_id == "d"
        assert placed.ttft_s == pytest.approx(0.504)  # one 500-token step with 4 decodes
        remote = router.door.place(_request(500, slo_ttft_ms=10_000, hint=Hint.ALWAYS), {})
        assert remote.ttft_s == pytest.approx(3.5, rel=0.05)  # 3,000 queued + 500
        with pytest.raises(RequestError) as e:
            router.door.place(_request(500, slo_ttft_ms=1_000, hint=Hint.ALWAYS), {})
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert "predicted time to first token 3.5" in str(e.value)
        assert "TTFT SLO of 1.00 s" in str(e.value)
    asyncio.run(main())


def test_the_hint_binds_the_placement():
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL, queued=3000),
                         _worker("d", WorkerRole.DECODE))
        assert router.door.place(_request(500, hint=Hint.ALWAYS), {}).disaggregated
        router = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE,
                                                                      running=50))
        assert not router.door.place(_request(5000, hint=Hint.NEVER), {}).disaggregated
        assert router.door.place(_request(5000), {}).disaggregated
    asyncio.run(main())


def test_a_burst_sees_its_own_requests_before_any_report():
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE))
        first = router.door.place(_request(2000, hint=Hint.ALWAYS), {})
        router.ledger.started("p", "t1", 2000)
        second = router.door.place(_request(2000, hint=Hint.ALWAYS), {})
        assert second.ttft_s == pytest.approx(first.ttft_s + 2.0, rel=0.05)
    asyncio.run(main())


def test_a_prefix_held_by_the_decode_worker_makes_local_prefill_cheaper():
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE),
                         _worker("e", WorkerRole.DECODE))
        cold = router.door.place(_request(3000, hint=Hint.NEVER), {})
        warm = router.door.place(_request(3000, hint=Hint.NEVER), {"e": 150})  # 2,400 tokens
        assert warm.placement.decode_id == "e"
        assert warm.ttft_s < cold.ttft_s - 1.5
    asyncio.run(main())


def test_the_queue_serves_the_earliest_deadline_first():
    async def main():
        router = _router(_worker("d", WorkerRole.COLOCATED))
        q = router.queue
        d = router.view.workers["d"]
        d.record = d.record.without_room()  # nobody fits until the worker reports room
        order: list[str] = []

        async def waiter(name: str, deadline: float | None):
            await q.wait(_request(10), False, set(), deadline=deadline)
            order.append(name)
            d.in_flight[name] = asyncio.Queue()  # holds its slot (one per worker below)

        object.__setattr__(router.config, "max_in_flight_per_worker", 1)
        now = time.time()
        tasks = [asyncio.create_task(waiter("late", now + 30)),
                 asyncio.create_task(waiter("none", None)),
                 asyncio.create_task(waiter("soon", now + 1))]
        while q.queued < 3:
            await asyncio.sleep(0)
        d.record = WorkerRecord(**{**d.record.__dict__, "free_blocks": 1000})
        for name in ("soon", "late", "none"):
            await router.view.notify()
            while name not in order:
                await asyncio.sleep(0.01)
            d.in_flight.clear()
        await asyncio.gather(*tasks)
        assert order == ["soon", "late", "none"]
    asyncio.run(main())


def test_a_local_prefill_that_would_crowd_the_decode_batchs_slos_goes_remote():
    async def main():
        from pdserve.router.interference import decoding

        router = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE))
        req = _request(300, slo_ttft_ms=10_000)
        assert not router.door.place(req, {}).disaggregated  # nothing to protect: local
        # a request decoding on d, 10 tokens under a 45 ms TPOT SLO: the local prefill's
        # 0.3 s stall takes it to 30 ms, within its SLO (local still fits) but at 2/3 of
        # it, less headroom (0.33) than the remote placement leaves the new request (0.97)
        router.door.interference.joined("d", "t1", 0.0, decoding(45.0, 11))
        placed = router.door.place(req, {})
        assert placed.disaggregated and placed.placement.prefill_id == "p"
    asyncio.run(main())


def test_admission_refuses_a_request_whose_predicted_tpot_misses_its_slo():
    async def main():
        busy = _worker("d", WorkerRole.DECODE, running=30)  # a 30 ms step: 1 ms per token
        router = _router(_worker("p", WorkerRole.PREFILL), busy)
        assert router.door.place(_request(100, slo_tpot_ms=50.0), {}).ttft_s > 0
        with pytest.raises(RequestError) as e:
            router.door.place(_request(100, slo_tpot_ms=25.0), {})
        assert "predicted time per output token 31 ms" in str(e.value)
        assert "TPOT SLO of 25 ms" in str(e.value)
        assert e.value.short_of is Shortage.DECODE  # the controller's signal
        with pytest.raises(RequestError) as e:  # a first token too late: prompt work
            router.door.place(_request(100, slo_ttft_ms=1e-3), {})
        assert e.value.short_of is Shortage.PREFILL
    asyncio.run(main())


def test_a_tpot_refusal_mostly_of_local_prompt_chunks_says_prefill_is_short():
    async def main():
        from dataclasses import replace

        busy = _worker("c", WorkerRole.COLOCATED, running=30)
        busy.record = replace(busy.record, prefill_stall_s=0.05)  # 50 ms a step of chunks
        router = _router(busy)
        with pytest.raises(RequestError) as e:
            router.door.place(_request(100, slo_tpot_ms=25.0), {})
        assert "predicted time per output token 81 ms" in str(e.value)
        assert e.value.short_of is Shortage.PREFILL
    asyncio.run(main())


def test_the_queue_places_a_local_prefill_away_from_the_batch_it_would_crowd():
    """The queue chooses as the door does: a local prefill's headroom counts the TPOT it
    leaves the requests already decoding on the worker (the interference book)."""
    async def main():
        from pdserve.router.interference import decoding

        router = _router(_worker("a", WorkerRole.COLOCATED), _worker("b", WorkerRole.COLOCATED))
        req = _request(300, slo_ttft_ms=10_000)
        # one request on a, 10 tokens under a 45 ms TPOT SLO: a's 0.3 s stall leaves it at
        # 2/3 of its SLO; b, equally loaded, protects no one
        router.door.interference.joined("a", "t1", 0.0, decoding(45.0, 11))
        for first in ("a", "b"):  # whichever the workers are listed in
            router.view.workers = dict(sorted(router.view.workers.items(),
                                              key=lambda kv: kv[0] != first))
            decode, prefill = await router.queue.wait(
                req, False, set(), hits={}, slo=router.door.slo(req))
            assert (decode.worker_id, prefill) == ("b", None)
    asyncio.run(main())


def test_a_queued_request_whose_prefill_worker_leaves_is_retried_locally():
    """The only prefill worker leaves (dies, or switches role) while a disaggregated
    request waits for a decode slot: the wait fails as a worker failure (retryable), and
    the next dispatch's route prefills where it decodes."""
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE))
        object.__setattr__(router.config, "max_in_flight_per_worker", 1)
        d = router.view.workers["d"]
        d.in_flight["other"] = asyncio.Queue()  # d's one slot is taken
        req = _request(300, slo_ttft_ms=10_000, hint=Hint.ALWAYS)
        placed = router.door.place(req, {})
        assert placed.disaggregated
        waiting = asyncio.create_task(router.queue.wait(
            req, True, set(), hits={}, slo=router.door.slo(req)))
        while router.queue.queued < 1:
            await asyncio.sleep(0)
        del router.view.workers["p"]
        await router.view.notify()
        with pytest.raises(RequestError) as e:
            await waiting
        assert e.value.code == "UNAVAILABLE" and e.value.retryable
        assert "no live prefill worker" in str(e.value)
        assert router.queue.queued == 0 and router.queue.queued_tokens == 0
        assert not router.door.disaggregates(req, set(), decided=placed.disaggregated)
        d.in_flight.clear()
        decode, prefill = await router.queue.wait(
            req, False, set(), hits={}, slo=router.door.slo(req))
        assert (decode.worker_id, prefill) == ("d", None)
    asyncio.run(main())


def test_an_idle_cluster_admits_what_it_predicts_would_miss():
    """Nothing ahead of the request: refusing frees nothing, and its outcome corrects a
    stale profile's predictions (router.calibration), which would else refuse forever."""
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE))
        req = _request(500, slo_ttft_ms=100, slo_tpot_ms=1.0)  # both past any prediction
        assert router.door.place(req, {}).ttft_s > 0.1
        busy = _router(_worker("p", WorkerRole.PREFILL), _worker("d", WorkerRole.DECODE,
                                                                 running=1))
        with pytest.raises(RequestError, match="refused at admission"):
            busy.door.place(req, {})
        queued = _router(_worker("p", WorkerRole.PREFILL, queued=10),
                         _worker("d", WorkerRole.DECODE, queued=10))
        with pytest.raises(RequestError, match="refused at admission"):
            queued.door.place(req, {})
    asyncio.run(main())


def test_each_placement_is_logged_at_debug_with_what_it_saw(caplog):
    async def main():
        router = _router(_worker("p", WorkerRole.PREFILL, queued=3000),
                         _worker("d", WorkerRole.DECODE, running=4))
        router.ledger.started("p", "t1", 200)
        with caplog.at_level("DEBUG", logger="pdserve.router.door"):
            router.door.place(_request(500, slo_ttft_ms=10_000, hint=Hint.ALWAYS), {},
                              "req-42")
        line, = [r.getMessage() for r in caplog.records if "placed" in r.getMessage()]
        assert line.startswith("request req-42 (500 tokens) placed prefilled on p, decoded on d")
        assert "p: 3000 tokens queued (report 3000, sent by this router 200)" in line
        assert "d: 0 tokens queued" in line and "batch 4" in line
    asyncio.run(main())
