"""The online TTFT correction (router.calibration): it follows a worker that runs steadily
slower or faster than the profile predicts, within bounds, from the requests the router
places; the predictor applies it to the worker that prefills; the router feeds it."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.protocol import CostProfile, StepModel, TransferModel, WorkerRecord, WorkerRole
from pdserve.router.calibration import SCALE_BOUNDS, TtftCalibration
from pdserve.router.observe import RequestOutcome, RequestRecord, notify
from pdserve.router.predict import Predictor, Side
from pdserve.router.router import Router, RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

PROFILE = CostProfile("measured", {}, {"layers": 4}, 100, 100_000,
                      StepModel(0.0, 0.01, 1e-3, 0.0, 0.0, 0.0), TransferModel(0.01, 1e9))


def _finished(predicted_ms: float, measured_ms: float, prefill: str = "p",
              decode: str = "d", attempts: int = 1) -> RequestRecord:
    final = pb.FinalResponse(prefill_worker=prefill, decode_worker=decode, attempts=attempts)
    final.timing.predicted_ttft_ms = predicted_ms
    final.timing.first_token_ms = measured_ms
    now = time.time()
    return RequestRecord("r", RequestOutcome.FINISHED, now, now, 10, 4, final=final)


def _side(wid: str, role: WorkerRole) -> Side:
    record = WorkerRecord(wid, role, "n", "", 16, 1000, 1000, 0, 0, 0, 0.0, 0.0,
                          chunk_tokens=1000)
    return Side(record, 0, 0)


def test_the_scale_follows_a_steadily_slow_worker_to_its_ratio():
    cal = TtftCalibration()
    for _ in range(60):  # the prediction it would make now, against 1.5x the profile's
        cal.observe("a", 1.0 * cal.scale("a"), 1.5)
    assert cal.scale("a") == pytest.approx(1.5, rel=0.01)
    assert cal.scale("b") == 1.0  # per worker
    for _ in range(60):  # the host quietens: it follows back
        cal.observe("a", 1.0 * cal.scale("a"), 0.8)
    assert cal.scale("a") == pytest.approx(0.8, rel=0.01)


def test_the_scale_stays_within_bounds_and_ignores_what_it_cannot_use():
    cal = TtftCalibration()
    for _ in range(100):
        cal.observe("a", 1.0, 50.0)
        cal.observe("b", 1.0, 0.001)
    assert (cal.scale("b"), cal.scale("a")) == pytest.approx(SCALE_BOUNDS)
    cal.observe("c", 0.0, 1.0)  # nothing predicted (no profile at admission)
    cal.observe("", 1.0, 2.0)
    assert cal.scale("c") == 1.0 and cal.scale("") == 1.0
    with pytest.raises(ValueError, match="step"):
        TtftCalibration(step=0.0)


def test_a_finished_request_moves_the_worker_that_prefilled_it():
    cal = TtftCalibration()
    cal.request_ended(_finished(1000.0, 2000.0, prefill="p"))
    assert cal.scale("p") > 1.0 and cal.scale("d") == 1.0
    cal.request_ended(_finished(1000.0, 500.0, prefill=""))  # local: its decode worker
    assert cal.scale("d") < 1.0
    before = (cal.scale("p"), cal.scale("d"))
    cal.request_ended(_finished(1000.0, 9000.0, attempts=2))  # waited for a failure
    failed = RequestRecord("x", RequestOutcome.FAILED, 0.0, 1.0, 10, 0)
    cal.request_ended(failed)
    assert (cal.scale("p"), cal.scale("d")) == before


def test_predictions_scale_by_the_prefilling_workers_calibration():
    cal = TtftCalibration()
    predictor = Predictor(PROFILE, cal)
    p, d = _side("p", WorkerRole.PREFILL), _side("d", WorkerRole.DECODE)
    before = predictor.remote(p, d, 500)
    remote, local = before.ttft_s, predictor.local(d, 500).ttft_s
    for _ in range(60):
        cal.observe("p", cal.scale("p"), 2.0)
    assert predictor.remote(p, d, 500).ttft_s == pytest.approx(2 * remote, rel=0.01)
    assert predictor.local(d, 500).ttft_s == local  # d's own is unchanged
    assert predictor.remote(p, d, 500).tpot_s == before.tpot_s  # TTFT only


def test_the_router_reports_its_finished_requests_to_the_calibration():
    async def main():
        router = Router(RouterConfig(cost_profile=PROFILE), None, None, lambda record: None)
        try:
            notify(router.observers, _finished(1000.0, 1500.0, prefill="p"))
            assert router.queue.predictor.calibration.scale("p") > 1.0
            assert router.door.predictor is router.queue.predictor
        finally:
            await router.stream.close()
    asyncio.run(main())
