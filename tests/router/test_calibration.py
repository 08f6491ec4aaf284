"""The online correction of predicted TTFT and TPOT (router.calibration): a TTFT follows a
worker that runs steadily slower or faster than the profile predicts, within bounds, from
the requests the router places (the predictor applies it to the worker that prefills; the
router feeds it); a TPOT follows the decode worker's measured step time alone."""

from __future__ import annotations

import asyncio
import math

import pytest

from pdserve.protocol import CostProfile, StepModel, TransferModel, WorkerRecord, WorkerRole
from pdserve.router.calibration import CLIP, SCALE_BOUNDS, STEP, Calibration, Scales
from pdserve.router.predict import Predictor, Side
from pdserve.router.router import Router, RouterConfig

PROFILE = CostProfile("measured", {}, {"layers": 4}, 100, 100_000,
                      StepModel(0.0, 0.01, 1e-3, 0.0, 0.0, 0.0), TransferModel(0.01, 1e9))


def _side(wid: str, role: WorkerRole) -> Side:
    record = WorkerRecord(wid, role, "n", "", 16, 1000, 1000, 0, 0, 0, 0.0, 0.0,
                          chunk_tokens=1000)
    return Side(record, 0, 2)


def test_a_scale_follows_a_steadily_slow_worker_to_its_ratio():
    s = Scales()
    for _ in range(60):  # the prediction it would make now, against 1.5x the profile's
        s.observe("a", 1.0 * s.scale("a"), 1.5)
    assert s.scale("a") == pytest.approx(1.5, rel=0.01)
    assert s.scale("b") == 1.0  # per worker
    for _ in range(60):  # the host quietens: it follows back
        s.observe("a", 1.0 * s.scale("a"), 0.8)
    assert s.scale("a") == pytest.approx(0.8, rel=0.01)


def test_the_first_ratios_are_averaged_so_one_request_corrects_a_stale_profile():
    s = Scales()
    s.observe("a", 1.0, 0.5)  # the profile is 2x slow: one request says so
    assert s.scale("a") == pytest.approx(0.5)
    # the next runs at the profile's speed (measured 1.0 where the scaled prediction
    # said 0.5): the geometric mean of the two ratios to the profile, 0.5 and 1.0
    s.observe("a", 0.5, 1.0)
    assert s.scale("a") == pytest.approx(math.sqrt(0.5))
    for _ in range(3):
        s.observe("a", 1.0, 1.0)
    s.observe("a", 1.0, 1.5)  # the 6th moves by the step alone
    assert s.scale("a") == pytest.approx(math.sqrt(0.5) * 1.5 ** 0.2)


def test_one_request_that_waited_for_something_else_moves_a_scale_as_a_2x_miss_would():
    settled = Scales()
    for _ in range(20):
        settled.observe("a", 1.0 * settled.scale("a"), 1.2)
    before = settled.scale("a")
    # a 145 ms prediction that took 2.7 s: its KV waited out another prompt's long step
    settled.observe("a", 0.145 * before, 2.7)
    assert settled.scale("a") == pytest.approx(before * CLIP ** STEP)
    # and a worker that mostly runs as predicted, with one in ten requests 10x late,
    # keeps a scale near what most of them measure (the mean log ratio would be 1.26)
    s = Scales()
    for i in range(200):
        s.observe("a", 1.0 * s.scale("a"), 10.0 if i % 10 == 9 else 1.0)
    assert 1.0 <= s.scale("a") < 1.2


def test_a_scale_stays_within_bounds_and_ignores_what_it_cannot_use():
    s = Scales()
    for _ in range(100):
        s.observe("a", 1.0, 50.0)
        s.observe("b", 1.0, 0.001)
    assert (s.scale("b"), s.scale("a")) == pytest.approx(SCALE_BOUNDS)
    s.observe("c", 0.0, 1.0)  # nothing predicted (no profile at admission)
    s.observe("", 1.0, 2.0)
    assert s.scale("c") == 1.0 and s.scale("") == 1.0
    with pytest.raises(ValueError, match="step"):
        Scales(step=0.0)


def test_a_first_token_moves_the_ttft_scale_of_the_worker_that_prefilled_it():
    cal = Calibration()
    cal.first_token("p", "d", 1.0, 2.0)
    assert cal.ttft.scale("p") > 1.0 and cal.ttft.scale("d") == 1.0
    # local: its decode worker's scale for the prompts it prefills itself, apart from the
    # one for prompts prefilled for another worker (an adaptive worker has both, in turn)
    cal.first_token("", "d", 1.0, 0.5)
    assert cal.local_ttft.scale("d") < 1.0 and cal.ttft.scale("d") == 1.0
    assert cal.local_ttft.scale("p") == 1.0
    assert (cal.ttft_scale("p", False), cal.ttft_scale("d", True)) == (
        cal.ttft.scale("p"), cal.local_ttft.scale("d"))
    before = (cal.ttft.scale("p"), cal.local_ttft.scale("d"))
    cal.first_token("p", "d", 0.0, 9.0)  # nothing predicted (no profile at admission)
    assert (cal.ttft.scale("p"), cal.local_ttft.scale("d")) == before


def test_the_tpot_follows_the_workers_measured_step_not_the_requests_measured_tpots():
    cal = Calibration()
    predictor = Predictor(PROFILE, cal)
    d = _side("d", WorkerRole.DECODE)
    before = predictor.remote(_side("p", WorkerRole.PREFILL), d, 500).tpot_s
    # requests' measured TPOTs move nothing (a burst's first requests decode in a batch
    # that grew after them; a prediction made now counts the batch as it is): the
    # calibration is told first tokens alone
    for _ in range(20):
        cal.first_token("p", "d", 1.0, 1.0)
    assert predictor.remote(_side("p", WorkerRole.PREFILL), d, 500).tpot_s == before
    cal.decode["d"] = 0.5  # the worker measured its steps at half the profile's
    assert predictor.remote(_side("p", WorkerRole.PREFILL), d, 500).tpot_s == \
        pytest.approx(0.5 * before)


def test_predictions_scale_by_the_serving_workers_calibration():
    cal = Calibration()
    predictor = Predictor(PROFILE, cal)
    p, d = _side("p", WorkerRole.PREFILL), _side("d", WorkerRole.DECODE)
    before, local = predictor.remote(p, d, 500), predictor.local(d, 500)
    for _ in range(60):
        cal.ttft.observe("p", cal.ttft.scale("p"), 2.0)
    after = predictor.remote(p, d, 500)
    assert after.ttft_s == pytest.approx(2 * before.ttft_s, rel=0.01)
    assert predictor.local(d, 500).ttft_s == local.ttft_s  # d's TTFT scale is untouched
    for _ in range(60):
        cal.local_ttft.observe("d", cal.local_ttft.scale("d"), 0.5)
    assert predictor.local(d, 500).ttft_s == pytest.approx(0.5 * local.ttft_s, rel=0.01)
    assert predictor.remote(p, d, 500).ttft_s == after.ttft_s  # by p's scale alone


def test_the_router_tells_the_calibration_at_first_tokens_not_as_an_observer():
    """Fed at each first token (router.router), not at the request's end: the end comes a
    whole decode later (tests/router/test_placed_cluster.py checks the timing)."""
    async def main():
        router = Router(RouterConfig(cost_profile=PROFILE), None, None, lambda record: None)
        try:
            assert router.calibration is router.door.predictor.calibration
            assert router.door.predictor is router.queue.predictor
            assert router.calibration not in router.observers
        finally:
            await router.stream.close()
    asyncio.run(main())


def test_a_first_token_on_a_second_dispatch_teaches_nothing():
    """It waited for a failure (a dead worker, a refused order), not for the worker that
    served it: only a first dispatch's first token moves a scale."""
    from pdserve.protocol import TokenChunk
    from pdserve.router.placement import Route
    from pdserve.router.retry import Attempt

    async def main():
        router = Router(RouterConfig(cost_profile=PROFILE), None, None, lambda record: None)
        try:
            route = Route(None, {}, None, 1.0, True)
            remote = Attempt(0.0, "d", "p", TokenChunk("t", ()))
            router._first_token(remote, 2, route, 5.0)
            assert router.calibration.ttft.scale("p") == 1.0
            router._first_token(remote, 1, route, 2.0)
            assert router.calibration.ttft.scale("p") == pytest.approx(2.0)
            local = Attempt(0.0, "d", "", TokenChunk("t", ()))
            router._first_token(local, 1, route, 0.5)
            assert router.calibration.local_ttft.scale("d") == pytest.approx(0.5)
        finally:
            await router.stream.close()
    asyncio.run(main())
