"""The simulator's adaptive deployment: its cost placement is the real router's choice on
the same loads, its controller is the real rule moving workers as the load shifts (never
within the dwell or the cooldown), a draining worker takes nothing new and switches only
once it holds nothing, and an adaptive run ends with nothing held."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.metrics import Slo
from pdserve.bench.sim.cluster import Deployment, simulate
from pdserve.bench.sim.costed import Ask
from pdserve.bench.sim.events import EventLoop
from pdserve.bench.sim.request import SimRequest
from pdserve.bench.sim.router import SimRouter
from pdserve.bench.sim.worker import SimWorker
from pdserve.bench.workload import arrival_times
from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.protocol.cost_profile import CostProfile, StepModel, TransferModel
from pdserve.router.config import RouterConfig
from pdserve.router.controller.decide import ControllerConfig
from pdserve.router.placement import Slo as PlacementSlo
from pdserve.router.placement import candidates, choose
from pdserve.router.predict import Predictor, Side

BLOCKS = 4096
# every step 20 ms plus 1 ms a token: a 1,000-token prompt takes about a second
STEP = StepModel(0.02, 0.0, 0.001, 1e-8, 1e-6, 1e-4)
PROFILE = CostProfile("measured", {}, {"layers": 4}, 1000, BLOCKS * 16, STEP,
                      TransferModel(0.004, 1e9), 0.003, 0.002)
ZERO = dict.fromkeys(("used_blocks", "in_flight", "batch", "context", "queued_tokens",
                      "waiting", "prefilling", "sent_tokens", "draining"), 0)


def cluster(config: RouterConfig, roles=(WorkerRole.PREFILL, WorkerRole.DECODE)):
    """A router over adaptive workers, as cluster.simulate makes them."""
    loop = EventLoop()
    workers = [SimWorker(f"w{i}", role, loop, PROFILE, max_num_batched_tokens=2048,
                         max_num_seqs=64, block_size=16, num_blocks=BLOCKS)
               for i, role in enumerate(roles)]
    for w in workers:
        w.adaptive = True
    router = SimRouter(loop, config, workers, PROFILE)
    for i, w in enumerate(workers):
        w.heartbeat.start(0.5 * i / len(workers), lambda: router.open > 0)
    return loop, workers, router


def publish(w: SimWorker, free: int, running: int, waiting: int, queued: int, rate: float,
            step_s: float, sent: int = 0, in_flight: int = 0) -> WorkerRecord:
    """Give the worker a heartbeat's figures and the router's counts; the record a
    registry would hold for them."""
    w.heartbeat.record = (free, running, waiting, queued)
    w.heartbeat.rate, w.heartbeat.step_s = rate, step_s
    w.sent_tokens, w.in_flight = sent, in_flight
    return WorkerRecord(w.worker_id, w.role, "n", "", 16, BLOCKS, free, running, waiting,
                        queued, 0.0, 0.0, prefill_tokens_per_s=rate, decode_step_s=step_s,
                        chunk_tokens=2048, adaptive=True)


@pytest.mark.parametrize("p_queued, d_queued, d_batch, slo_ms, expect", [
    (0, 5000, 10, (4000, 200), "remote"),  # the decode worker's queue is long: apart
    (3000, 0, 1, (4000, 200), "local"),  # the prefill worker's is: where it decodes
    (3000, 0, 1, (None, None), "local"),  # no SLO of its own: the router's default TTFT
    # ten requests decoding with no TPOT SLO the router knows of: a local prefill's stall
    # delays each of them, which outweighs the prefill queue
    (3000, 0, 10, (4000, 200), "remote"),
    (3000, 0, 10, (None, None), "remote"),
    (3000, 0, 10, (300, 200), "refused"),  # no placement's first token comes in time
    (0, 5000, 10, (4000, 40), "refused"),  # no placement's TPOT is within the SLO
])
def test_the_sims_placement_is_the_real_functions_choice_on_the_same_loads(
        p_queued, d_queued, d_batch, slo_ms, expect):
    loop, (p, d), router = cluster(RouterConfig(cost_profile=PROFILE))
    p_rec = publish(p, BLOCKS, 1, 2, p_queued, 5000.0, 0.0, sent=500, in_flight=3)
    d_rec = publish(d, BLOCKS - 400, d_batch, 0, d_queued, 4000.0, 0.045, in_flight=d_batch)
    n = 800
    ask = Ask(range(n), slo_ttft_ms=slo_ms[0], slo_tpot_ms=slo_ms[1])
    # by hand: the sides as router.placement's side_of makes them (queue: the larger of
    # report and ledger; batch: of running + waiting and this router's requests)
    sides_p = [Side(p_rec, max(p_queued, 500), 3)]
    sides_d = [Side(d_rec, d_queued, d_batch)]
    slo = PlacementSlo(slo_ms[0] / 1000 if slo_ms[0] else 30.0,
                       slo_ms[1] / 1000 if slo_ms[1] else None)
    # none of the decoding requests is this router's: none has a TPOT SLO it protects
    best = choose(candidates(Predictor(PROFILE), n, sides_p, sides_d, sides_d,
                             unprotected=lambda side: side.batch), slo)
    placed, error = router.costed.place(ask)
    if expect == "refused":
        assert placed is None and error.code == "RESOURCE_EXHAUSTED"
        assert "refused at admission: predicted" in str(error)
        # what the controller hears: a first token too late is prompt work, a TPOT the
        # decode batch's
        side = "DECODE" if "time per output token" in str(error) else "PREFILL"
        assert error.short_of.name == side
        assert not slo.met(best.prediction)
        return
    assert placed is not None and placed.placement == best
    assert placed.disaggregated == (expect == "remote")
    # the queue's head takes the same pair (nothing waits ahead: the same sides)
    chosen = router.costed.pick(ask, best.disaggregated, set(), slo)
    assert chosen == ((d, p) if best.disaggregated else (d, None))


def test_a_cost_placed_run_chooses_both_ways_and_leaves_nothing_held():
    prompts = [64, 1500, 200, 1800, 40, 900] * 10
    outputs = [80, 8, 40, 4, 120, 16] * 10
    dep = Deployment(0, 0, 0, adaptive=2,
                     router=RouterConfig(cost_profile=PROFILE, controller=ControllerConfig(
                         dwell_s=5.0, cooldown_s=2.0)))
    run = simulate(dep, PROFILE, prompts, outputs, arrival_times(60, 2.0, seed=3),
                   sent_slo=Slo(4000, 150))
    kinds = {r.disaggregated for r in run.results if r.success}
    assert kinds == {True, False}
    assert all(r.success or r.refused for r in run.results)
    assert all(s == ZERO for s in run.final_state.values()), run.final_state


def _shifting(dwell_s: float):
    """Three adaptive workers (1 prefill + 2 decode) under 40 s of long prompts with
    two-token answers, then, from 60 s, short prompts with 400-token answers."""
    ctl = ControllerConfig(dwell_s=dwell_s, cooldown_s=5.0, batch_cap=8, window_s=10.0)
    dep = Deployment(0, 0, 0, adaptive=3,
                     router=RouterConfig(disaggregation_threshold=1, controller=ctl))
    first = arrival_times(40, 1.0, seed=1)
    then = [60 + t for t in arrival_times(120, 2.0, seed=2)]
    run = simulate(dep, PROFILE, [2000] * 40 + [20] * 120, [2] * 40 + [400] * 120,
                   first + then, keep_itl=False)
    return ctl, run


def test_the_controller_moves_a_worker_to_prefill_then_back_to_decode_as_the_load_turns():
    ctl, run = _shifting(dwell_s=20.0)
    moves = [(m.from_role, m.to_role) for m in run.switches]
    first, later = run.switches[0], [m for m in run.switches if m.time >= 60]
    assert first.time < 40 and moves[0] == (WorkerRole.DECODE, WorkerRole.PREFILL)
    assert later and all(m.to_role is WorkerRole.DECODE for m in later)
    assert "decode pressure" in later[0].reason
    assert all(s == ZERO for s in run.final_state.values()), run.final_state
    assert run.summary(None)["completed"] == 160


@pytest.mark.parametrize("dwell_s", [20.0, 100.0])
def test_no_move_comes_within_the_cooldown_nor_a_role_within_its_dwell(dwell_s):
    ctl, run = _shifting(dwell_s)
    times = [m.time for m in run.switches]
    assert all(b - a >= ctl.cooldown_s for a, b in zip(times, times[1:], strict=False))
    last: dict[str, float] = {}
    for m in run.switches:
        if m.worker_id in last:  # it took its last role after that order
            assert m.time - last[m.worker_id] >= dwell_s
        last[m.worker_id] = m.time
    if dwell_s > 60:  # the worker moved to prefill at the start is held there a while
        back = [m for m in run.switches[1:] if m.worker_id == run.switches[0].worker_id]
        assert all(m.time >= dwell_s for m in back)


def test_a_draining_worker_takes_nothing_new_and_switches_holding_no_block(monkeypatch):
    seen, taken = [], []
    switched = SimRouter._switched

    def watch(self, w, old):
        seen.append((w.loop.now, w.role, w.serving, w.holds_nothing(), w.used_blocks))
        switched(self, w, old)

    def recorded(add):
        def call(self, r):
            taken.append((self.worker_id, self.serving))
            return add(self, r)
        return call

    monkeypatch.setattr(SimRouter, "_switched", watch)
    monkeypatch.setattr(SimWorker, "add_prefill", recorded(SimWorker.add_prefill))
    monkeypatch.setattr(SimWorker, "reserve", recorded(SimWorker.reserve))
    loop, (p, d), router = cluster(RouterConfig(disaggregation_threshold=1))
    requests = [SimRequest(i, 1000, 30, 0.0) for i in range(6)]
    requests += [SimRequest(6 + i, 1000, 30, 2.0 + 0.1 * i) for i in range(4)]
    router.arrive_all(requests)
    loop.at(0.4, p.order, WorkerRole.DECODE)
    loop.run()
    drain, done = seen  # the drain began, then the switch
    assert drain[1] is WorkerRole.PREFILL and not drain[2] and not drain[3]  # it held jobs
    assert done[1:] == (WorkerRole.DECODE, True, True, 0) and done[0] > drain[0] + 1.0
    assert p.role_since == done[0] and p.switches == 1
    assert all(serving for _, serving in taken)  # no order reached a draining worker
    assert all(r.t_end > 0 for r in requests) and all(not r.disagg for r in requests[6:])
    assert p.used_blocks == d.used_blocks == 0 and p.in_flight == d.in_flight == 0


def test_simulate_runs_the_adaptive_deployment_on_a_sweep_workload(tmp_path, capsys):
    from pdserve.deploy.cli import main

    path, out = tmp_path / "profile.json", tmp_path / "sim.json"
    PROFILE.save(path)
    assert main(["simulate", "--profile", str(path), "--prefill", "0", "--decode", "0",
                 "--adaptive", "2", "--adaptive-dwell", "10", "--cost-profile",
                 "--sweep-workload", "shifting", "--num-prompts", "12",
                 "--request-rate", "0.5", "1", "--slo-ttft-ms", "8000", "--slo-tpot-ms",
                 "120", "--send-slo", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["deployment"] == "2A" and len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["dataset"] == "sweep:shifting" and "sim_switches" in run
        assert set(run["sim_roles"]) == {"adaptive-0", "adaptive-1"}
        assert run["completed"] + run["failed"] + run["refused"] == 12
    assert "SLO attainment" in capsys.readouterr().out


def test_the_side_by_side_of_a_sweep_the_simulator_made_shows_no_difference(tmp_path):
    """The plumbing: 'measured' files written by the simulator itself (the sweep's
    requests, the same deployments) come out equal, ratios and all; a rerun of adaptive
    alone borrows the static rows of its sibling."""
    from pdserve.bench.sim import adaptive_sweeps
    from pdserve.bench.sim.workload import sweep_requests
    from pdserve.bench.sweep import WORKLOADS

    w, n, slo = WORKLOADS["shifting"], 10, Slo(8000.0, 120.0)
    rates = [0.5, 1.0]
    deps = adaptive_sweeps.deployments(PROFILE)
    runs = []
    for i, rate in enumerate(rates):
        for name, dep in deps.items():
            run = simulate(dep, PROFILE, *sweep_requests(w, n, 0, i, rate), sent_slo=slo,
                           warm=True).summary(slo)
            runs.append({**run, "deployment": name, "request_rate": rate, "seed": 0})
    data = {"workload": {**w.__dict__, "rates": rates}, "num_prompts": n, "seeds": [0],
            "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}, "runs": runs,
            "command": "python -m pdserve.bench.sweep --send-slo"}
    first, rerun = tmp_path / "shifting.json", tmp_path / "rerun" / "shifting.json"
    rerun.parent.mkdir()
    first.write_text(json.dumps(data))
    rerun.write_text(json.dumps({**data, "runs": [r for r in runs
                                                  if r["deployment"] == "adaptive"]}))
    results = adaptive_sweeps.run_all([first, rerun], PROFILE, PROFILE)
    for f in results:
        assert len(f["rows"]) == 3 * len(rates) and len(f["ratios"]) == len(rates)
        for row in f["rows"]:
            for key in adaptive_sweeps.KEYS:
                assert row[f"measured_{key}"] == row[f"simulated_{key}"]
            assert row.get("borrowed", False) == (f["file"] == str(rerun)
                                                  and row["deployment"] != "adaptive")
        for point in f["ratios"]:
            assert point["measured_ratio"] == point["simulated_ratio"]
    assert "| shifting (rerun) | 0.5 |" in adaptive_sweeps.table(results)
