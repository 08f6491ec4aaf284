"""The sweep's workloads (bench.sweep_workloads): traces keep their bursts at the probed mean
rate, Mooncake's requests share prefix blocks, `shifting` alternates its phases by arrival
time, and no two runs share a prompt."""

from __future__ import annotations

import pytest

from pdserve.bench.sweep_workloads import WORKLOADS, samples_for
from pdserve.bench.workload import (
    DEFAULT_TRACES_DIR,
    Sample,
    shared_prefix_tokens,
    trace_dataset,
)


@pytest.mark.parametrize("name", ["azure-code", "azure-conv", "mooncake"])
def test_a_trace_is_replayed_at_the_probed_mean_rate(name):
    w = WORKLOADS[name]
    s = samples_for(w, 60, seed=0, rate_index=1, rate=0.5)
    assert len(s) == 60 and s[0].arrival == 0.0
    assert (len(s) - 1) / s[-1].arrival == pytest.approx(0.5)
    gaps = [b.arrival - a.arrival for a, b in zip(s, s[1:], strict=False)]
    assert max(gaps) > 3 * min(gaps)  # the trace's own shape, not evenly spaced
    assert all(1 <= len(x.prompt) <= w.max_input and 1 <= x.output_len <= w.max_output
               for x in s)
    calibration = samples_for(w, 6, seed=99)
    assert all(x.arrival is None for x in calibration)


def test_mooncake_requests_share_prefix_blocks_and_runs_do_not_share_prompts():
    w = WORKLOADS["mooncake"]
    s = samples_for(w, 200, seed=0, rate_index=1, rate=1.0)
    firsts = [x.prompt[:26] for x in s if len(x.prompt) >= 26]
    assert len(set(firsts)) < len(firsts)  # some leading block is shared
    other = samples_for(w, 200, seed=1, rate_index=1, rate=1.0)
    assert not {x.prompt for x in s} & {x.prompt for x in other}


def test_mooncake_replays_the_traces_tail_where_prompts_share_their_prefixes():
    w = WORKLOADS["mooncake"]
    s = samples_for(w, 32, seed=0, rate_index=1, rate=0.4)
    last = trace_dataset("mooncake", DEFAULT_TRACES_DIR, 4000, w.length_scale, 1.0,
                         w.max_input, w.max_output, seed=0)[-32:]
    assert [len(x.prompt) for x in s] == [len(x.prompt) for x in last]
    # a window of the head shares (almost) nothing: its prefixes come back much later
    head = trace_dataset("mooncake", DEFAULT_TRACES_DIR, 32, w.length_scale, 1.0,
                         w.max_input, w.max_output, seed=0)
    assert sum(shared_prefix_tokens(head)) == 0
    shared = sum(shared_prefix_tokens(s)) / sum(len(x.prompt) for x in s)
    assert 0.4 < shared < 0.8


def test_shared_prefix_tokens_counts_whole_blocks_an_earlier_prompt_began_with():
    a = Sample(tuple(range(40)), 1)
    b = Sample(tuple(range(20)) + (99,) * 20, 1)  # the first block of a, then its own
    c = Sample((7,) + tuple(range(1, 40)), 1)  # a's second block after another first one
    assert shared_prefix_tokens([a]) == [0]
    assert shared_prefix_tokens([a, b]) == [0, 16]
    assert shared_prefix_tokens([a, b, a]) == [0, 16, 32]  # a's partial last block: not held
    assert shared_prefix_tokens([a, c]) == [0, 0]  # blocks match only behind the same prefix
    assert shared_prefix_tokens([a, b], block_size=8) == [0, 16]


def test_shifting_alternates_phases_by_arrival_time():
    w = WORKLOADS["shifting"]
    s = samples_for(w, 200, seed=0, rate_index=1, rate=1.0)
    chat, summarize = WORKLOADS["chat"], WORKLOADS["summarize"]
    for x in s:
        phase = int(x.arrival // w.phase_s) % 2
        lo, hi = ((chat.input_len * (1 - chat.range_ratio), chat.input_len * 1.5) if phase == 0
                  else (summarize.input_len * 0.75, summarize.input_len * 1.25))
        assert lo <= len(x.prompt) <= hi
    assert {int(x.arrival // w.phase_s) % 2 for x in s} == {0, 1}


def test_a_runs_prefix_sharing_counts_only_prompts_let_in_before_a_disaggregated_one():
    from pdserve.bench.metrics import RequestResult
    from pdserve.bench.sweep import _prefix_sharing

    a = Sample(tuple(range(32)), 1)
    b = Sample(tuple(range(16)) + (5,) * 16, 1)  # a's first block
    results = [RequestResult(32, refused=True),  # a refused: nothing left to reuse
               RequestResult(32, True, disaggregated=True),
               RequestResult(32, True, disaggregated=True)]
    out = _prefix_sharing([a, b, a], results, kv_bytes_per_token=10)
    assert out["prompt_tokens"] == 96 and out["shared_prefix_tokens"] == 16 + 32
    assert out["disagg_shared_prefix_tokens"] == 16  # the last a finds only b's first block
    assert out["disagg_full_kv_bytes"] == 64 * 10
