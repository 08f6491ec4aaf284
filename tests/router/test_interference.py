"""Admission's TPOT bound (router.interference): what a local prefill stalls, what a
request's SLO can absorb at the worker's step time, and the router refusing a prompt that
fits on no worker."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.protocol import SamplingParams, WorkerRecord, WorkerRole
from pdserve.router.errors import RequestError
from pdserve.router.interference import InterferenceBook, decoding, stall_s
from pdserve.router.policy import Hint
from pdserve.router.router import Router, RouterConfig
from pdserve.router.validate import ValidRequest
from pdserve.router.view import LiveWorker


def _record(wid: str = "c", rate: float = 1000.0, step: float = 0.05) -> WorkerRecord:
    return WorkerRecord(wid, WorkerRole.COLOCATED, "n", "", 16, 100, 100, 0, 0, 0,
                        time.time(), 1.0, rate, 0, step)


def test_a_prompts_stall_is_its_tokens_over_the_prefill_rate():
    assert stall_s(_record(rate=1000.0), 500) == pytest.approx(0.5)
    assert stall_s(_record(rate=0.0), 500) == 0.0  # not measured yet: nothing to go by


def test_a_request_meets_its_tpot_while_step_time_plus_its_stalls_per_token_do():
    d = decoding(150.0, 11)  # 10 gaps of 150 ms
    assert d.tpot_with(0.05, 1.0) == pytest.approx(0.15)  # 50 ms + 1 s / 10
    assert decoding(None, 11) is None and decoding(150.0, 1) is None  # nothing to protect


def test_each_local_prefill_is_charged_to_the_requests_already_there():
    book = InterferenceBook()
    c = _record("c", step=0.05)
    book.joined("c", "a", stall=0.2, request=decoding(150.0, 11))  # stalls no one before it
    assert book.fits(c, 1.0) and not book.fits(c, 1.01)
    book.joined("c", "b", stall=0.7, request=None)  # no SLO: charges a, protects nothing
    assert book.fits(c, 0.3) and not book.fits(c, 0.31)
    assert book.fits(_record("other"), 100.0)
    book.joined("c", "d", stall=0.0, request=decoding(60.0, 11))  # disaggregated
    assert book.protected("c") == 2 and not book.fits(c, 0.2)  # d: 50 + 20 > 60 ms
    side = type("Side", (), {"record": c, "batch": 3})()  # a, b and d decode there
    assert book.unprotected(side) == 1  # b
    book.left("c", "d")
    book.left("c", "a")
    book.left("c", "a")  # idempotent
    assert book.fits(c, 100.0) and book.protected("c") == 0


def test_a_grown_batch_leaves_less_room_and_a_lost_request_holds_nothing_up():
    book = InterferenceBook()
    book.joined("c", "a", 0.0, decoding(150.0, 11))
    assert book.fits(_record("c", step=0.05), 1.0)
    assert not book.fits(_record("c", step=0.10), 1.0)  # 100 ms steps: 0.5 s left
    assert book.fits(_record("c", step=0.10), 0.5)
    assert book.fits(_record("c", step=0.2), 10.0)  # past its SLO already: cannot be saved
    assert book.fits(_record("c", step=0.0), 10.0)  # no step time measured yet


def _request(n: int, tpot_ms: float | None, max_tokens: int = 11) -> ValidRequest:
    return ValidRequest("", tuple(range(1, n + 1)), SamplingParams(max_tokens=max_tokens),
                        Hint.NEVER, None, tpot_ms)


def test_the_router_refuses_a_prompt_that_fits_on_no_worker_and_avoids_where_it_does_not():
    async def main():
        a, b = LiveWorker(_record("a"), None), LiveWorker(_record("b"), None)
        router = Router(RouterConfig(default_ttft_slo_s=0), None, None, lambda record: None)
        router.view.workers = {"a": a, "b": b}
        try:
            router.door.interference.joined("a", "t1", 0.0, decoding(150.0, 11))  # 1 s of room
            assert router.door.admit(_request(1500, 150.0), disagg=False) == {"a"}  # 1.5 s stall
            assert router.door.admit(_request(500, 150.0), disagg=False) == set()
            router.door.interference.joined("b", "t2", 0.0, decoding(70.0, 11))  # 0.2 s
            with pytest.raises(RequestError) as e:
                router.door.admit(_request(1500, None), disagg=False)
            assert e.value.code == "RESOURCE_EXHAUSTED" and "TPOT SLO" in str(e.value)
            assert router.door.admit(_request(1500, None), disagg=True) == set()  # stalls no one
        finally:
            await router.stream.close()

    asyncio.run(main())
