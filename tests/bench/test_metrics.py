"""The benchmark's arithmetic: vLLM's metric definitions, SLO attainment over all issued
requests (failures are misses), goodput by linear interpolation, the SLO-scale search,
arrivals and datasets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdserve.bench.metrics import (
    RequestResult,
    Slo,
    attainment_rate,
    goodput_per_worker,
    min_slo_scale,
    prediction_errors,
    summarize,
)
from pdserve.bench.workload import (
    DEFAULT_TRACES_DIR,
    arrival_times,
    random_dataset,
    trace_dataset,
)

TRACES = DEFAULT_TRACES_DIR  # the traces shipped with the package


def ok(ttft, latency, n, prompt=10):
    gaps = [(latency - ttft) / (n - 1)] * (n - 1) if n > 1 else []
    return RequestResult(prompt, True, "", ttft, gaps, latency, n)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    r = ok(0.5, 2.5, 5)
    assert r.tpot == pytest.approx(0.5)
    assert ok(0.5, 0.5, 1).tpot is None  # one token: no TPOT
    assert RequestResult(10, False, "boom").tpot is None


def test_kv_moved_is_what_the_server_reports_else_the_whole_prompts_kv():
    delta, full, local = ok(0.1, 1.0, 4, prompt=100), ok(0.1, 1.0, 4, prompt=30), ok(0.1, 1.0, 4)
    delta.disaggregated = full.disaggregated = True
    delta.kv_bytes = 36 * 10  # the decode worker held 64 of the 100 prompt tokens
    s = summarize([delta, full, local], duration_s=1.0, kv_bytes_per_token=10)
    assert s["disagg_requests"] == 2 and s["disagg_kv_bytes"] == 360 + 30 * 10


def test_prediction_errors_compare_the_routers_predictions_with_what_was_measured():
    a, b, unplaced = ok(0.5, 2.5, 5), ok(1.0, 1.9, 10), ok(0.5, 1.0, 3)  # TPOT 500, 100 ms
    a.stages = {"first_token_ms": 400.0, "predicted_ttft_ms": 500.0, "predicted_tpot_ms": 400.0}
    b.stages = {"first_token_ms": 1000.0, "predicted_ttft_ms": 900.0,
                "predicted_tpot_ms": 130.0}
    e = prediction_errors([a, b, unplaced])
    assert e["predicted_ttft_requests"] == e["predicted_tpot_requests"] == 2
    assert e["predicted_ttft_median_abs_error"] == pytest.approx((0.25 + 0.1) / 2)
    assert e["predicted_ttft_median_error"] == pytest.approx((0.25 - 0.1) / 2)
    assert e["predicted_tpot_median_abs_error"] == pytest.approx((0.2 + 0.3) / 2)
    assert e["predicted_tpot_median_error"] == pytest.approx((-0.2 + 0.3) / 2)
    assert prediction_errors([unplaced])["predicted_tpot_median_error"] is None
    b.disaggregated = True
    s = summarize([a, b, unplaced], duration_s=3.0)  # and each request's, in order
    assert s["predicted_ttfts_ms"] == [500.0, 900.0, None]
    assert s["predicted_tpots_ms"] == [400.0, 130.0, None]
    assert s["server_ttfts_ms"] == [400.0, 1000.0, None]
    assert s["disaggregated"] == [False, True, False]


def test_summary_uses_vllm_keys_and_counts_failures_as_slo_misses():
    results = [ok(0.1, 1.0, 10), ok(0.2, 3.0, 10), RequestResult(10, False, "UNAVAILABLE")]
    s = summarize(results, duration_s=4.0, slo=Slo(ttft_ms=150, tpot_ms=200))
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(5.0)
    assert s["mean_ttft_ms"] == pytest.approx(150)
    assert s["median_tpot_ms"] == pytest.approx((100 + 311.11) / 2, rel=1e-3)
    assert s["p99_e2el_ms"] == pytest.approx(np.percentile([1000, 3000], 99))
    # only the first meets both; the failure is a miss: 1 of 3
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["slo_ttft_attainment"] == pytest.approx(1 / 3)
    assert s["slo_tpot_attainment"] == pytest.approx(1 / 3)
    assert s["request_goodput"] == pytest.approx(1 / 4)
    for key in ("mean_itl_ms", "std_ttft_ms", "p90_tpot_ms", "total_token_throughput"):
        assert key in s


@pytest.mark.parametrize("points, expected, note", [
    ([(0.5, 1.0), (1.0, 0.95), (1.5, 0.85), (2.0, 0.4)], 1.25, ""),  # 0.95 -> 0.85 at 1.25
    ([(1.0, 0.9), (2.0, 0.5)], 1.0, ""),  # exactly on the target
    ([(0.5, 0.99), (1.0, 0.97)], 1.0, "all above"),  # a lower bound
    ([(0.5, 0.5), (1.0, 0.2)], 0.0, "none above"),
    ([(2.0, 0.5), (1.0, 1.0)], 1.0 + (1.0 - 0.9) / 0.5, ""),  # unsorted input
])
def test_goodput_interpolates_at_the_crossing(points, expected, note):
    rate, got_note = attainment_rate(points)
    assert rate == pytest.approx(expected) and got_note == note
    assert goodput_per_worker(points, 2)[0] == pytest.approx(expected / 2)


def test_min_slo_scale_is_the_90th_percentile_of_required_scales_with_failures_infinite():
    base = Slo(ttft_ms=100, tpot_ms=10)
    results = [ok(0.1 * (i + 1), 0.1 * (i + 1) + 0.009, 2) for i in range(9)]
    results.append(RequestResult(10, False, "x"))
    # required scales 1..9 (TTFT-bound) and inf: 90% of 10 is met at scale 9
    assert min_slo_scale(results, base) == pytest.approx(9)
    assert math.isinf(min_slo_scale(results, base, target=1.0))


def test_arrivals_end_at_n_over_rate_and_burstiness_changes_the_spread():
    times = arrival_times(200, rate=4.0, burstiness=1.0, seed=1)
    assert times[0] == 0 and times[-1] == pytest.approx(50.0)
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    bursty = np.diff(arrival_times(2000, 4.0, burstiness=0.2, seed=1))
    smooth = np.diff(arrival_times(2000, 4.0, burstiness=5.0, seed=1))
    assert bursty.std() > 2 * smooth.std()
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


def test_random_dataset_lengths_and_shared_prefix():
    samples = random_dataset(50, 100, 20, range_ratio=0.5, prefix_len=16, seed=3)
    lens = [len(s.prompt) - 16 for s in samples]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 10
    assert len({s.prompt[:16] for s in samples}) == 1
    assert all(10 <= s.output_len <= 30 for s in samples)
    assert random_dataset(5, 10, 5, seed=1) == random_dataset(5, 10, 5, seed=1)


def test_trace_replay_scales_lengths_and_times_and_shares_mooncake_prefixes():
    conv = trace_dataset("azure-conv", TRACES, 20, length_scale=0.5, time_scale=2.0)
    raw = trace_dataset("azure-conv", TRACES, 20)
    assert [s.arrival for s in conv] == pytest.approx([2 * s.arrival for s in raw])
    assert [len(s.prompt) for s in conv] == [max(1, round(len(s.prompt) * 0.5)) for s in raw]
    rows = [json.loads(line)["hash_ids"] for line in
            (TRACES / "mooncake_synthetic.jsonl").read_text().splitlines()[:300]]
    moon = trace_dataset("mooncake", TRACES, 300, length_scale=1 / 64)  # 8-token blocks
    pairs = [(i, j) for i in range(300) for j in range(i + 1, 300)
             if rows[i][:2] == rows[j][:2] and rows[i] and len(moon[i].prompt) >= 16
             and len(moon[j].prompt) >= 16]
    assert pairs, "the trace has requests sharing their first two prefix blocks"
    for i, j in pairs[:20]:
        assert moon[i].prompt[:16] == moon[j].prompt[:16]
    unrelated = [(i, j) for i in range(50) for j in range(i + 1, 50)
                 if rows[i] and rows[j] and rows[i][0] != rows[j][0]]
    assert all(moon[i].prompt[:8] != moon[j].prompt[:8] for i, j in unrelated)
