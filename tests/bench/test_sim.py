"""The cluster simulator: its clock orders events, every request it admits ends (finished,
or counted refused or failed), every block and slot is given back, its latencies are the
sums the cost model says they are, and its indexed worker choice is the router's own."""

from __future__ import annotations

import random

import pytest

from pdserve.bench.metrics import Slo
from pdserve.bench.sim import leap
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.sim.events import EventLoop
from pdserve.bench.sim.picker import DecodePicker, PrefillPicker
from pdserve.bench.sim.worker import SimWorker
from pdserve.bench.workload import arrival_times
from pdserve.protocol.cost_profile import CostProfile, StepModel, TransferModel, chunk_pairs
from pdserve.router.config import RouterConfig
from pdserve.router.policy import WorkerLoad, choose_decode, choose_prefill
from pdserve.worker.rate import DecodeStepTime

STEP_S = 0.01
FLAT = StepModel(0.0, STEP_S, 0.0, 0.0, 0.0)  # every step 10 ms, whatever it computes
LINK = TransferModel(0.004, 1e9)


def profile(step=FLAT, capacity=1 << 20, router_s=0.003, stream_s=0.002,
            transfer=LINK) -> CostProfile:
    return CostProfile("measured", {}, {"layers": 4}, 1000, capacity, step, transfer,
                       router_s, stream_s)


CPU_LIKE = StepModel(0.002, 0.02, 0.0013, 2e-8, 2e-6)


def test_the_clock_runs_events_in_time_order_and_ties_in_scheduling_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, seen.append, "c")
    loop.at(1.0, seen.append, "a")
    loop.at(1.0, lambda: (seen.append("b"), loop.after(0.5, seen.append, "b2")))
    loop.at(1.0, lambda: loop.at(0.0, seen.append, "late"))  # never before now
    loop.run()
    assert seen == ["a", "b", "late", "b2", "c"] and loop.now == 2.0 and loop.pending == 0


def test_one_request_alone_costs_exactly_its_steps():
    p = profile()
    colocated = simulate(Deployment(0, 0, 1), p, [100], [5], [0.0]).results[0]
    # intake, one prefill step (the first token), four decode steps; the stream on top
    assert colocated.ttft == pytest.approx(p.router_s + STEP_S + p.stream_s)
    assert colocated.latency == pytest.approx(p.router_s + 5 * STEP_S + p.stream_s)
    assert colocated.tpot == pytest.approx(STEP_S)
    assert colocated.itl == pytest.approx([STEP_S] * 4)
    disagg = simulate(Deployment(1, 1, 0, router=RouterConfig(disaggregation_threshold=1)), p,
                      [100], [5], [0.0]).results[0]
    # the last layer's KV leaves after the prefill; the decode worker is idle: no wait
    kv = max(p.transfer.seconds(100 * 1000 / 4), p.transfer.seconds(100 * 1000) - STEP_S)
    assert disagg.disaggregated
    assert disagg.ttft == pytest.approx(p.router_s + STEP_S + kv + p.stream_s)
    assert disagg.tpot == pytest.approx(STEP_S)
    assert disagg.stages["kv_transfer_ms"] == pytest.approx(kv * 1e3)


@pytest.mark.parametrize("pack", [None, 256, 4096])
def test_a_prefill_worker_packs_prompts_as_the_engine_does(pack):
    """Three prompts at once on a CPU-like step: the first starts alone; the next two
    (200 and 100 tokens) wait for it, then share a step only within the pack limit (256,
    the default for a measured CPU profile: 300 tokens exceed it, so each runs alone)."""
    p = profile(step=CPU_LIKE)
    run = simulate(Deployment(1, 1, 0, router=RouterConfig(disaggregation_threshold=1),
                              prefill_pack_tokens=pack), p, [300, 200, 100], [2, 2, 2],
                   [0.0, 0.0, 0.0])
    first, second, third = run.results
    compute = [r.stages["prefill_compute_ms"] for r in run.results]
    alone = [CPU_LIKE.step_s(n, chunk_pairs(0, n)) * 1e3 for n in (300, 200, 100)]
    assert compute[0] == pytest.approx(alone[0])
    if pack == 4096:
        together = CPU_LIKE.step_s(300, chunk_pairs(0, 200) + chunk_pairs(0, 100)) * 1e3
        assert compute[1] == compute[2] == pytest.approx(together)
    else:
        assert compute[1:] == pytest.approx(alone[1:])
        # the third waited for the second's step, its first token that much earlier
        waited = third.stages["prefill_queue_ms"] - second.stages["prefill_queue_ms"]
        assert waited == pytest.approx(alone[1])


def _workload(n, seed, max_prompt=3000, max_out=200):
    rng = random.Random(seed)
    prompts = [int(min(max_prompt, rng.paretovariate(1.2) * 60)) for _ in range(n)]
    outputs = [rng.randint(1, max_out) for _ in range(n)]
    return prompts, outputs, arrival_times(n, 20.0, burstiness=0.3, seed=seed)


DEPLOYMENTS = [
    Deployment(1, 1, 0),
    Deployment(2, 3, 0, max_num_batched_tokens=512),
    Deployment(0, 0, 2, max_num_seqs=8),
    Deployment(1, 1, 1, block_size=4),
    # KV for a few hundred tokens per worker: preemptions and waiting for blocks
    Deployment(1, 2, 0, num_blocks=320, block_size=16, max_num_batched_tokens=256),
    Deployment(0, 0, 2, num_blocks=300, block_size=16, max_num_batched_tokens=256),
]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: f"{d.name}-{d.num_blocks}")
def test_every_request_ends_and_nothing_is_left_held(deployment):
    prompts, outputs, arrivals = _workload(300, seed=len(deployment.name))
    prompts = [min(p, 4000) for p in prompts]
    run = simulate(deployment, profile(CPU_LIKE), prompts, outputs, arrivals)
    finished = [r for r in run.results if r.success]
    refused = [r for r in run.results if r.refused]
    failed = [r for r in run.results if not r.success and not r.refused]
    assert len(finished) + len(refused) + len(failed) == len(prompts)
    for r in run.results:
        assert r.success or r.refused or "fits on no worker" in r.error, r.error
        if r.success:
            assert len(r.itl) == r.output_len - 1  # every token came, once
            assert r.ttft > 0 and r.latency >= r.ttft
    assert finished  # far above capacity: most are refused, what is admitted finishes
    state = run.final_state
    assert all(s == dict.fromkeys(("used_blocks", "in_flight", "batch", "context",
                                   "queued_tokens", "waiting", "prefilling", "sent_tokens",
                                   "draining"), 0)
               for s in state.values()), state
    if deployment.num_blocks:
        assert run.preemptions > 0  # the tight cases did exercise preemption


def test_admission_refuses_a_burst_beyond_the_ttft_slo_and_keeps_the_admitted_in_it():
    prompts, outputs = [800] * 200, [20] * 200
    slo = Slo(ttft_ms=3000, tpot_ms=1000)
    # the first request alone lets the prefill worker measure its rate (as a warm-up
    # request does on a real one); then the burst
    arrivals = [0.0] + [5.0 + i * 0.01 for i in range(199)]
    run = simulate(Deployment(1, 1, 0, router=RouterConfig(default_ttft_slo_s=3.0)),
                   profile(CPU_LIKE), prompts, outputs, arrivals)
    summary = run.summary(slo)
    assert summary["refused"] > 50 and summary["failed"] == 0
    assert summary["slo_admitted_attainment"] >= 0.9


class _Fake:
    def __init__(self, load: WorkerLoad):
        self.worker_id, self._load = load.worker_id, load

    def load(self) -> WorkerLoad:
        return self._load


def test_the_indexed_choice_is_the_routers_choice():
    rng = random.Random(5)
    for trial in range(300):
        fakes = [_Fake(WorkerLoad(f"w{i}", rng.randint(0, 40), 40, 16, rng.randint(0, 5),
                                  rng.randint(0, 3), rng.randint(0, 5000), rng.randint(0, 4)))
                 for i in range(rng.randint(1, 12))]
        decode, prefill = DecodePicker(fakes, 4), PrefillPicker(fakes, 4)
        for _ in range(5):  # loads change; the index is told
            f = rng.choice(fakes)
            f._load = WorkerLoad(f.worker_id, rng.randint(0, 40), 40, 16, rng.randint(0, 5),
                                 rng.randint(0, 3), rng.randint(0, 5000), rng.randint(0, 4))
            decode.update(f)
            prefill.update(f)
        loads = [f.load() for f in fakes]
        n = rng.randint(1, 700)
        want = choose_decode(loads, n, 4)
        got = decode.pick(n)
        assert (got.worker_id if got else None) == (want.worker_id if want else None), trial
        want = choose_prefill(loads, n, {}, 4)
        got = prefill.pick()
        assert (got.worker_id if got else None) == (want.worker_id if want else None), trial


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: f"{d.name}-{d.num_blocks}")
def test_leaping_over_decode_steps_changes_no_request(deployment):
    """Without per-token times the workers run a batch's steps up to its next finish as
    one event; every request's latencies are those of stepping one by one."""
    prompts, outputs, arrivals = _workload(300, seed=7)
    stepped = simulate(deployment, profile(CPU_LIKE), prompts, outputs, arrivals)
    leapt = simulate(deployment, profile(CPU_LIKE), prompts, outputs, arrivals, keep_itl=False)
    assert leapt.events < stepped.events
    for a, b in zip(stepped.results, leapt.results, strict=True):
        assert (a.success, a.refused) == (b.success, b.refused)
        assert a.ttft == pytest.approx(b.ttft, rel=1e-9, abs=1e-9)
        assert a.latency == pytest.approx(b.latency, rel=1e-9, abs=1e-9)
    assert all(not any(s.values()) for s in leapt.final_state.values())


def test_neighbours_on_a_host_slow_each_other_only_while_both_compute():
    from dataclasses import replace

    p = replace(profile(), contention_decode=0.5, contention_prefill=0.25)
    alone = simulate(Deployment(0, 0, 2, host_size=2), p, [100], [5], [0.0]).results[0]
    assert alone.tpot == pytest.approx(STEP_S)  # the other worker is idle: no slowdown
    both = simulate(Deployment(0, 0, 2, host_size=2), p, [100, 100], [5, 5], [0.0, 0.0])
    # a step is slowed when a neighbour computes as it begins: the second prefill begins
    # beside the first, then their decode steps run side by side
    first, second = sorted(both.results, key=lambda r: r.ttft)
    assert first.ttft == pytest.approx(p.router_s + STEP_S + p.stream_s)
    assert second.ttft == pytest.approx(p.router_s + 1.25 * STEP_S + p.stream_s)
    assert all(STEP_S < r.tpot <= 1.5 * STEP_S + 1e-12 for r in both.results)
    apart = simulate(Deployment(0, 0, 2, host_size=1), p, [100, 100], [5, 5], [0.0, 0.0])
    assert all(r.tpot == pytest.approx(STEP_S) for r in apart.results)
    prompts, outputs, arrivals = _workload(200, seed=3)
    contended = replace(profile(CPU_LIKE), contention_decode=0.3, contention_prefill=0.1)
    d = Deployment(1, 1, 0, host_size=2)
    stepped = simulate(d, contended, prompts, outputs, arrivals)
    leapt = simulate(d, contended, prompts, outputs, arrivals, keep_itl=False)
    for a, b in zip(stepped.results, leapt.results, strict=True):
        assert a.latency == pytest.approx(b.latency, rel=1e-9, abs=1e-9)


def test_leaping_changes_no_request_when_admission_weighs_the_step_time():
    """With SLOs sent, the router passes a local prefill over workers whose decodes it would
    stall, from the decode step time they publish: a run of steps as one event publishes
    what stepping one by one would."""
    prompts, outputs, arrivals = _workload(300, seed=11)
    d, slo = Deployment(0, 0, 2, max_num_seqs=16), Slo(5000, 60)
    stepped = simulate(d, profile(CPU_LIKE), prompts, outputs, arrivals, sent_slo=slo)
    leapt = simulate(d, profile(CPU_LIKE), prompts, outputs, arrivals, sent_slo=slo,
                     keep_itl=False)
    assert leapt.events < stepped.events
    for a, b in zip(stepped.results, leapt.results, strict=True):
        assert (a.success, a.refused) == (b.success, b.refused)
        assert a.latency == pytest.approx(b.latency, rel=1e-9, abs=1e-9)


def test_the_meter_over_a_run_is_the_meter_stepped():
    rng = random.Random(2)
    for _ in range(200):
        meter = DecodeStepTime()
        meter.seconds = rng.choice([0.0, rng.uniform(0.001, 0.05)])
        before = meter.seconds
        a, c, context, batch = rng.uniform(1e-3, 1e-2), rng.uniform(1e-9, 1e-7), \
            rng.randint(0, 300_000), rng.randint(1, 256)
        k = rng.randint(0, 300)
        for i in range(k):
            meter.observe(0, batch, a + c * (context + i * batch))
        got = leap.ewma(before, meter.weight, a + c * context, c * batch, k)
        assert got == pytest.approx(meter.seconds, rel=1e-12)


@pytest.mark.parametrize("deployment", DEPLOYMENTS[:2] + DEPLOYMENTS[4:5],
                         ids=lambda d: f"{d.name}-{d.num_blocks}")
def test_every_leap_ends_once_and_no_stale_end_acts(deployment, monkeypatch):
    """A cut leap's first end event surfaces later, stale: it must change nothing."""
    started, ended = [], []
    start, end = SimWorker._start_leap, SimWorker._end_leap

    def spy_start(self):
        ok = start(self)
        if ok:
            started.append(self._leap)
        return ok

    def spy_end(self, run, j):
        live = run is self._leap and j == run.to
        steps = self.steps
        end(self, run, j)
        if live:
            ended.append(run)
            assert self.steps == steps + j and j <= run.m
        else:
            assert self.steps == steps  # stale: nothing moved

    monkeypatch.setattr(SimWorker, "_start_leap", spy_start)
    monkeypatch.setattr(SimWorker, "_end_leap", spy_end)
    prompts, outputs, arrivals = _workload(300, seed=5)
    run = simulate(deployment, profile(CPU_LIKE), prompts, outputs, arrivals, keep_itl=False)
    assert started and len(ended) == len(started)
    assert {id(r) for r in ended} == {id(r) for r in started}  # each once, none left
    assert any(r.to < r.m for r in ended)  # some were cut
    assert all(not any(s.values()) for s in run.final_state.values())


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: f"{d.name}-{d.num_blocks}")
def test_whenever_the_router_picks_every_worker_is_ranked_by_its_load_now(deployment,
                                                                           monkeypatch):
    """The router re-ranks a worker only when its load object changed (`ranked`); every
    index holding it must then hold the load `load()` gives at the moment of a pick."""
    from pdserve.bench.sim import picker

    first = picker._Index.first
    checked = []

    def spy_first(self, fits, *args):
        for w in members[id(self)]:
            assert self._seen[w.worker_id] is w.load(), w.worker_id
        checked.append(1)
        return first(self, fits, *args)

    members: dict[int, list] = {}
    init = picker._Index.__init__

    def spy_init(self, workers, max_in_flight, rank):
        members[id(self)] = list(workers)
        init(self, members[id(self)], max_in_flight, rank)

    monkeypatch.setattr(picker._Index, "first", spy_first)
    monkeypatch.setattr(picker._Index, "__init__", spy_init)
    prompts, outputs, arrivals = _workload(300, seed=3)
    prompts = [min(p, 4000) for p in prompts]
    simulate(deployment, profile(CPU_LIKE), prompts, outputs, arrivals,
             sent_slo=Slo(2000, 100))
    assert checked
