"""The simulator against a short real run on this machine: a quick cost profile of the real
engine (measured here, so the check holds on any machine), then the same 16 requests
through a real 1 prefill + 1 decode cluster (worker processes pinned one per core, Redis,
ZMQ, the gRPC API) and through the simulator on that profile.

The machine's speed drifts by 1.2-1.5x within minutes on a shared host, so a profile
taken minutes before the run is off by as much (a real run measured 1.48 s of median TTFT
where the profiles before and after it both simulated 2.1-2.2 s). The run's own prefills
measure the speed of that moment: the profile's step model is scaled by the median, over
the requests, of the prefill compute the server reported over the profile's prediction
for that prompt, and the run is simulated on the scaled profile. What is checked is then
what the simulator adds to the step costs (the prefill queue, the KV transfer, the
decode worker's admission, the router and the stream) and the decode steps, predicted at
the speed the prefills measured. The scale itself must lie within 2x: a profile further
off is wrong, not drifted.

Tolerance: median TTFT and median TPOT within 35% of the measured. The simulator's target
on full sweeps is 20% (bench/README.md, Simulator); a 16-request run on a quick profile
(half the step points) on a shared 2-core machine moves more than that between two real
runs, so this test checks the simulator is in the right place, not the last 15%."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import astuple, replace

import pytest

from pdserve.bench.backends import PdServeBackend
from pdserve.bench.costmodel.measure import Options, measure
from pdserve.bench.metrics import summarize
from pdserve.bench.serve_bench import run_load
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.workload import Sample, arrival_times, random_dataset, warmup_samples
from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import CostProfile, StepModel, chunk_pairs
from pdserve.router.config import RouterConfig

pytestmark = pytest.mark.slow

TOLERANCE = 0.35
RATE = 0.25


def scaled(step: StepModel, speed: float) -> StepModel:
    """The step model of an engine `speed` times as slow."""
    return StepModel(*(speed * v for v in astuple(step)))


def prefill_speed(profile: CostProfile, results) -> float:
    """Median over the requests of the server's prefill compute over the profile's."""
    return statistics.median(
        r.stages["prefill_compute_ms"] / 1e3
        / profile.step.step_s(r.prompt_len, chunk_pairs(0, r.prompt_len))
        for r in results if r.stages.get("prefill_compute_ms"))


def test_a_scaled_step_model_is_that_much_slower():
    step = StepModel(0.01, 0.02, 1e-5, 1e-8, 1e-7, 1e-3)
    assert scaled(step, 1.5).step_s(300, 4000, 100, 2) == pytest.approx(
        1.5 * step.step_s(300, 4000, 100, 2))


def test_a_simulated_1p1d_run_matches_a_real_one():
    """A second real run, only when the first is off: the two cores of this shared host
    drift apart at times (the prefill measured at one speed, the decode run at another),
    which one run's prefills cannot see; a simulator that is off is off twice."""
    profile = measure(Options(quick=True, router_requests=8))
    misses = []
    for _ in range(2):
        misses = off_by(profile)
        if not misses:
            return
    pytest.fail(f"off by more than {TOLERANCE:.0%} in two runs; the last: {misses}")


def off_by(profile: CostProfile) -> list[tuple]:
    """One real run and its simulation: (key, measured, simulated, speed) of each median
    off by more than TOLERANCE."""
    samples = random_dataset(16, 256, 24, 0.5, seed=11)
    times = arrival_times(len(samples), RATE, seed=11)
    router = RouterConfig(disaggregation_threshold=1)
    cluster = LocalCluster(ClusterSpec(prefill=1, decode=1, pin_cores=True, router=router))
    try:
        async def real():
            backend = PdServeBackend(cluster.address)
            try:
                for s in warmup_samples(samples, 2, seed=12):
                    await backend.send(s)
                return await run_load(backend, [Sample(s.prompt, s.output_len)
                                                for s in samples], RATE, seed=11,
                                      progress=False)
            finally:
                await backend.close()

        results, duration = asyncio.run(real())
    finally:
        cluster.close()
    measured = summarize(results, duration)
    assert measured["completed"] == len(samples)
    speed = prefill_speed(profile, results)
    assert 0.5 <= speed <= 2.0, speed
    now = replace(profile, step=scaled(profile.step, speed))
    simulated = simulate(Deployment(1, 1, 0, router=router), now,
                         [len(s.prompt) for s in samples], [s.output_len for s in samples],
                         times, warm=True).summary(None)
    return [(key, measured[key], simulated[key], speed)
            for key in ("median_ttft_ms", "median_tpot_ms")
            if abs(simulated[key] - measured[key]) / measured[key] > TOLERANCE]
