"""The overload replay's arithmetic: a trace window rescaled to a target rate, capacity from
a closed loop's steady window, calibration requests of typical lengths, the verdicts against
the robustness targets, and the plot (from a synthetic result, no server)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.bench import overload
from pdserve.bench.metrics import RequestResult
from pdserve.bench.workload import Sample


@pytest.mark.parametrize("trace", sorted(overload.REPLAYS))
def test_a_window_replays_at_the_asked_mean_rate_with_its_own_gaps(trace):
    r = overload.REPLAYS[trace]
    window = overload.samples(r, 40, seed=1)
    scale = overload.time_scale_for(window, 0.3)
    timed = overload.samples(r, 40, seed=1, time_scale=scale)
    assert overload.natural_rate(timed) == pytest.approx(0.3)
    # the same gaps, only stretched: the trace's burstiness is kept
    assert [t.arrival for t in timed] == pytest.approx([w.arrival * scale for w in window])
    assert all(1 <= len(s.prompt) <= r.max_input and s.output_len <= r.max_output
               for s in window)
    assert overload.samples(r, 5, seed=2)[0].prompt != window[0].prompt  # fresh tokens


def test_natural_rate_needs_a_span():
    with pytest.raises(ValueError):
        overload.natural_rate([Sample((1,), 1, 0.0), Sample((2,), 1, 0.0)])


def test_steady_rate_leaves_out_the_ramp_up_and_the_drain():
    # 28 requests, 4 at a time: the first wave (t=10..13), one per 0.5 s, then the drain
    done = [10, 11, 12, 13] + [13 + 0.5 * i for i in range(1, 21)] + [30, 35, 40, 45]
    assert overload.steady_rate(done, 4) == pytest.approx(2.0)
    assert overload.steady_rate([1.0, 2.0, 3.0], 4) == pytest.approx(1.0)  # too few: all
    with pytest.raises(ValueError):
        overload.steady_rate([1.0], 4)


def test_typical_requests_span_the_length_quantiles_without_arrival_times():
    window = [Sample(tuple(range(n)), 4, float(n)) for n in range(1, 101)]
    picked = overload.typical(window, 5)
    assert [len(s.prompt) for s in picked] == [11, 31, 51, 71, 91]
    assert all(s.arrival is None for s in picked)


class Turns:
    """A backend that answers after `delay` and refuses every third request."""

    name = "turns"

    def __init__(self):
        self.sent = 0
        self.most = self.now = 0

    async def send(self, sample):
        self.sent += 1
        turn = self.sent
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.01)
        self.now -= 1
        if turn % 3 == 0:
            return RequestResult(len(sample.prompt), False, "x", refused=True)
        return RequestResult(len(sample.prompt), True, "", 0.001, [], 0.01, 1)


def test_capacity_is_a_closed_loop_at_the_given_concurrency():
    backend = Turns()
    window = [Sample((i,), 1) for i in range(30)]
    cap = asyncio.run(overload.capacity(backend, window, 3))
    assert backend.sent == 30 and backend.most == 3
    assert cap["completed"] == 20 and cap["refused"] == 10
    assert 10 < cap["rate"] < 1000
    summary = cap["summary"]  # vLLM's keys over the closed loop's requests
    assert summary["completed"] == 20 and summary["refused"] == 10
    assert summary["disagg_requests"] == 0 and summary["median_ttft_ms"] == 1.0


def run(mult, failed=0, refused=0, attainment=1.0, p99_refusal=0.0, leaked=0):
    return {"trace": "mooncake", "deployment": "1p1d", "multiplier": mult, "failed": failed,
            "refused": refused, "slo_admitted_attainment": attainment,
            "p99_refusal_ms": p99_refusal, "num_prompts": 10, "capacity": 0.5,
            "cluster_after": {"leaked_blocks": leaked}}


def test_verdicts_against_issue_14s_targets():
    good = overload.verdicts([run(0.5), run(1, refused=1, p99_refusal=3.0),
                              run(2, refused=5, attainment=0.95, p99_refusal=12.0)])
    assert all(v["met"] for v in good.values()), good
    assert good["admitted_attainment_at_2x"]["value"] == 0.95
    bad = overload.verdicts([run(0.5, failed=1), run(2, refused=2, attainment=0.5,
                                                    p99_refusal=80.0, leaked=3)])
    assert not any(v["met"] for v in bad.values()), bad
    assert bad["failed_after_admission"]["value"] == 1
    assert bad["leaked_blocks"]["value"] == 3
    # a refusal latency only counts where something was refused
    assert overload.verdicts([run(2, p99_refusal=0.0)])["p99_refusal_ms"]["value"] is None


def test_plot_overload_draws_every_trace(tmp_path):
    pytest.importorskip("matplotlib")
    from pdserve.bench.robustness_plots import plot_overload

    runs = [run(m, refused=r) for m, r in ((0.5, 0), (1, 1), (2, 4))]
    runs += [{**x, "deployment": dep} for x in runs for dep in ("2colo", "adaptive")]
    result = {"replays": {"mooncake": {}}, "slo": {"mooncake": {"ttft_ms": 5e3,
                                                               "tpot_ms": 90.0}},
              "runs": runs}
    plot_overload(result, tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 10_000


def test_every_deployment_the_bench_can_start_has_a_colour_and_a_label():
    from pdserve.bench.report import COLORS, LABELS
    from pdserve.bench.server import DEPLOYMENTS

    assert set(DEPLOYMENTS) <= set(COLORS) & set(LABELS)
