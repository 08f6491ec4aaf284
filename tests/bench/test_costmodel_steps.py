"""What `pdserve profile` reads from a step (tokens, attention pairs, context) and how a
point is taken from repeated runs, on scheduler objects and scripted runs (no timing)."""

from __future__ import annotations

from pdserve.bench.costmodel.steps import DISCARD_BELOW_S, FULL, QUICK, point, step_features
from pdserve.engine import Request, SamplingParams, ScheduledBatch, ScheduledRequest
from pdserve.protocol.cost_profile import chunk_pairs


def _request(prompt: int, outputs: int = 0) -> Request:
    r = Request("r", list(range(prompt)), SamplingParams(max_tokens=64))
    r.output_token_ids = [1] * outputs
    return r


def test_features_of_a_mixed_step():
    decoding = _request(100, outputs=3)  # 103 tokens, the newest one computed now
    chunk_after_prefix = _request(300)
    batch = ScheduledBatch([ScheduledRequest(decoding, 102, 1),
                            ScheduledRequest(chunk_after_prefix, 256, 44),
                            ScheduledRequest(_request(16), 0, 16)], [])
    tokens, pairs, context, seqs = step_features(batch)
    assert tokens == 1 + 44 + 16 and seqs == 1
    assert pairs == chunk_pairs(256, 44) + chunk_pairs(0, 16)
    assert context == 103  # the decoding sequence attends all its tokens


def test_a_point_discards_a_short_first_run_and_keeps_the_median():
    times = iter([0.5, 0.3, 0.1, 0.2, 9.9])
    calls = []

    def run():
        calls.append(1)
        return next(times), (len(calls), 0, 0, len(calls))

    obs = point(run, "decode", repeats=3, budget_s=6.0)
    assert len(calls) == 4  # the first (0.5 s) discarded, three kept
    assert obs.seconds == 0.2 and obs.tokens == 4 and obs.kind == "decode" and obs.seqs == 4


def test_a_long_step_is_kept_and_not_repeated_past_the_budget():
    calls = []

    def run():
        calls.append(1)
        return DISCARD_BELOW_S * 5, (2048, chunk_pairs(0, 2048), 0, 0)

    obs = point(run, "prefill", repeats=3, budget_s=DISCARD_BELOW_S * 4)
    assert len(calls) == 1 and obs.seconds == DISCARD_BELOW_S * 5


def test_grids_fit_their_engines():
    for grid in (FULL, QUICK):
        assert all(o % 16 == 0 for o in grid.prefill_offsets)  # whole cached blocks
        assert all(b * c <= grid.decode_max_tokens for b, c in grid.decode_points)
        assert grid.token_budget >= max(grid.mixed_chunks) + max(grid.mixed_batches)
    assert FULL.num_points == 8 + 2 * 3 + 25 + 2 * 3
    assert QUICK.num_points < 16
