"""`pdserve simulate` and `pdserve plan`: they explain themselves, write `pdserve bench`'s
result keys, enumerate the deployments they promise, and the planner's rate search finds a
known goodput."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.sim.plan import Prober, candidates
from pdserve.deploy.cli import main
from pdserve.protocol.cost_profile import CostProfile, StepModel, TransferModel

CPU_LIKE = StepModel(0.002, 0.02, 0.0013, 2e-8, 2e-6)


@pytest.fixture()
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    CostProfile("measured", {"cpu": "test"}, {"name": "m", "layers": 30}, 46080, 8192,
                CPU_LIKE, TransferModel(0.002, 1e9), 0.003, 0.002).save(path)
    return path


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_help_explains_the_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--profile" in out and "--slo-ttft-ms" in out and "--dataset" in out


def test_simulate_writes_the_bench_result_per_rate_and_the_goodput(profile_path, tmp_path,
                                                                   capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--profile", str(profile_path), "--prefill", "1", "--decode",
                 "1", "--disaggregation-threshold", "1", "--num-prompts", "40",
                 "--input-len", "700", "--output-len", "40", "--range-ratio", "0.25",
                 "--request-rate", "0.2", "5", "--seeds", "0", "1",
                 "--slo-ttft-ms", "5000", "--slo-tpot-ms", "60", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 4
    for run in result["runs"]:
        for key in ("request_throughput", "median_ttft_ms", "p99_tpot_ms", "mean_itl_ms",
                    "slo_attainment", "request_goodput", "disagg_requests"):
            assert key in run
        assert run["completed"] + run["failed"] + run["refused"] == 40
    low, high = (result["summary"]["attainment"][i][1] for i in (0, 1))
    assert low >= 0.9 > high  # 5 req/s of 700-token prompts is far past one prefill worker
    assert 0.2 <= result["summary"]["goodput"] < 5
    assert "goodput" in capsys.readouterr().out


def test_the_candidates_are_every_split_times_every_setting():
    found = candidates(3, [512, 2048], [16], [1, 128])
    splits = {(d.prefill, d.decode, d.colocated) for d in found}
    assert splits == {(1, 2, 0), (2, 1, 0), (0, 0, 3)}
    assert len(found) == 2 * 2 * 2 + 2  # colocated: no threshold to vary
    assert all(d.workers == 3 for d in found)


class _Known(Prober):
    """Attainment 1 up to 3.3 req/s, then 0."""

    def __init__(self):
        self.calls = 0

    def attainment(self, deployment, rate):
        self.calls += 1
        return 1.0 if rate <= 3.3 else 0.0


def test_the_rate_search_finds_a_known_goodput():
    prober = _Known()
    found = prober.goodput(candidates(2, [2048], [64], [1])[0], 0.9, hi=1.0, steps=12)
    assert found.goodput == pytest.approx(3.3, abs=0.01)
    assert found.curve == tuple(sorted(found.curve)) and prober.calls < 20


@pytest.mark.slow
def test_plan_ranks_two_worker_deployments_and_draws_them(profile_path, tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["plan", "--profile", str(profile_path), "--workers", "2",
                 "--num-prompts", "60", "--input-len", "768", "--output-len", "48",
                 "--range-ratio", "0.25", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "50",
                 "--bisections", "5", "--json", str(out), "--plot", str(png)]) == 0
    ranked = json.loads(out.read_text())
    assert {d["deployment"] for d in ranked} == {"1P1D", "2C"}
    per_worker = [d["goodput_per_worker"] for d in ranked]
    assert per_worker == sorted(per_worker, reverse=True) and per_worker[0] > 0
    assert png.stat().st_size > 0
    assert "best of 3 deployments of 2 workers" in capsys.readouterr().out


def _workload_args(**kw):
    import argparse

    from pdserve.bench.workload import DEFAULT_TRACES_DIR

    base = dict(dataset="random", traces_dir=DEFAULT_TRACES_DIR, num_prompts=50,
                input_len=400, output_len=40, range_ratio=0.5, prefix_len=0,
                length_scale=1.0, time_scale=1.0, max_input_len=None, max_output_len=512,
                vocab_size=49152, seed=0, burstiness=1.0)
    return argparse.Namespace(**{**base, **kw})


def test_requests_are_the_benchs_own_up_to_a_size_and_lengths_alone_past_it(monkeypatch):
    from pdserve.bench.serve_bench import build_samples
    from pdserve.bench.sim import workload

    args = _workload_args()
    exact = workload.requests(args, seed=3)
    samples = build_samples(workload.with_args(args, seed=3))
    assert exact.prompt_lens == [len(s.prompt) for s in samples]
    assert exact.output_lens == [s.output_len for s in samples] and exact.trace_times is None
    monkeypatch.setattr(workload, "EXACT_UP_TO", 10)
    drawn = workload.requests(args, seed=3)
    assert len(drawn.prompt_lens) == 50
    assert all(200 <= n <= 600 for n in drawn.prompt_lens)
    assert all(20 <= n <= 60 for n in drawn.output_lens)
    trace = workload.requests(_workload_args(dataset="mooncake", num_prompts=9000,
                                             length_scale=0.01), seed=0)
    times = trace.trace_times
    assert len(trace.prompt_lens) == 9000 > 3993  # the trace, replayed past its end
    assert times == sorted(times) and trace.prompt_lens[3993] == trace.prompt_lens[0]
    stretched = trace.arrivals(100.0, 1.0, 0, rate_scaled=True)
    assert stretched[-1] == pytest.approx(9000 / 100.0)


def test_pd_ratios_pick_the_nearest_splits():
    found = candidates(8, [2048], [64], [1], ratios=[(1, 3), (1, 1), (1, 100)])
    assert {(d.prefill, d.decode, d.colocated) for d in found} == {
        (2, 6, 0), (4, 4, 0), (1, 7, 0), (0, 0, 8)}


def test_validation_against_a_sweep_the_simulator_itself_made_shows_no_error():
    """The plumbing: a 'measured' sweep written by the simulator (same requests, same
    deployments) validates with zero error and the same ranking."""
    from pdserve.bench.metrics import Slo, goodput_per_worker
    from pdserve.bench.sim.cluster import simulate
    from pdserve.bench.sim.validate import DEPLOYMENTS, errors, validate_sweep
    from pdserve.bench.sweep import WORKLOADS, samples_for
    from pdserve.bench.workload import arrival_times

    profile = CostProfile("measured", {}, {"layers": 30}, 46080, 8192, CPU_LIKE,
                          TransferModel(0.002, 1e9), 0.003, 0.002)
    w = WORKLOADS["summarize"]
    slo, n, seeds = Slo(5000.0, 50.0), 8, [0, 1]
    runs, summary = [], {}
    for name, deployment in DEPLOYMENTS.items():
        points = []
        for i, rate in enumerate(w.rates):
            atts = []
            for seed in seeds:
                s = samples_for(w, n, seed, i + 1)
                run = simulate(deployment, profile, [len(x.prompt) for x in s],
                               [x.output_len for x in s], arrival_times(n, rate, 1.0, seed),
                               warm=True).summary(slo)
                run.update({"deployment": name, "request_rate": rate, "seed": seed})
                runs.append(run)
                atts.append(run["slo_attainment"])
            points.append((rate, sum(atts) / len(atts)))
        gp, note = goodput_per_worker(points, deployment.workers)
        summary[name] = {"goodput_per_worker": gp, "goodput_note": note}
    data = {"workload": {**w.__dict__, "rates": list(w.rates)},
            "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}, "num_prompts": n,
            "seeds": seeds, "runs": runs, "summary": summary}
    result = validate_sweep(data, profile)
    err = errors(result)
    assert result["same_ranking"] is not False  # None when the goodputs tie
    assert result["ranking"]["measured"] == result["ranking"]["simulated"]
    assert len(result["rows"]) == 2 * len(w.rates)
    assert err["attainment_abs_err_max"] == 0 and err["ttft_p50_rel_err_median"] == 0
    assert all(e == 0 for e in err["goodput_rel_err"].values())
