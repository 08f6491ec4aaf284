"""Predicted TTFT/TPOT (router.predict) and the placement by predicted cost
(router.placement), on a synthetic profile whose answers are worked out by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.protocol import CostProfile, StepModel, TransferModel, WorkerRecord, WorkerRole
from pdserve.router.calibration import SCALE_BOUNDS
from pdserve.router.placement import Placement, Slo, candidates, choose
from pdserve.router.predict import Prediction, Predictor, Side

STEP = StepModel(base_s=0.01, floor_s=0.02, token_s=1e-5, pair_s=0.0, context_s=0.0,
                 seq_s=1e-3)


def _profile(latency_s: float = 0.001, bytes_per_s: float = 1e6) -> CostProfile:
    return CostProfile("measured", {}, {"layers": 10}, kv_bytes_per_token=100,
                       kv_capacity_tokens=100_000, step=STEP,
                       transfer=TransferModel(latency_s, bytes_per_s))


def _side(wid: str, role: WorkerRole, queued: int = 0, batch: int = 0, cached: int = 0,
          used_blocks: int = 0, chunk: int = 1000) -> Side:
    record = WorkerRecord(wid, role, "n", "", 16, 1000, 1000 - used_blocks, batch, 0, queued,
                          0.0, 0.0, chunk_tokens=chunk)
    return Side(record, queued, batch, cached)


def test_prefill_steps_by_hand():
    p = Predictor(_profile())
    assert p.prefill_s(0, 500, 0, 1000) == (pytest.approx(0.03), pytest.approx(0.03))
    # 1,500 queued: one full step, then 500 queued + 500 of the prompt, then its last 500
    total, stall = p.prefill_s(1500, 1000, 0, 1000)
    assert total == pytest.approx(0.09)
    assert stall == pytest.approx(0.06)  # the prompt's own two steps
    # 10 decoding sequences share each step's budget and add their cost to it
    total, stall = p.prefill_s(0, 990, 0, 1000, seqs=10)
    decode_only = 0.01 + 0.02 + 10 * 1e-3
    assert total == pytest.approx(0.01 + max(0.02, 1000 * 1e-5) + 10 * 1e-3)
    assert stall == pytest.approx(total - decode_only)


def test_remote_ttft_counts_the_transfer_tail_and_the_decode_side_cache():
    p = Predictor(_profile())
    prefill = _side("p", WorkerRole.PREFILL)
    full = p.remote(prefill, _side("d", WorkerRole.DECODE), 1000)
    # prefill 0.03 s; 100 kB at 1 MB/s = 0.1 s on the wire, 0.03 of it hidden behind the
    # compute; the last layer's tenth and the latency left; an idle decode worker admits
    # at once
    assert full.ttft_s == pytest.approx(0.03 + 0.001 + 0.01 + 0.07)
    half = p.remote(prefill, _side("d", WorkerRole.DECODE, cached=512), 1000)
    wire = 488 * 100 / 1e6
    assert half.ttft_s == pytest.approx(0.03 + 0.001 + wire / 10 + wire - 0.03)
    assert half.ttft_s < full.ttft_s
    # the prefill worker's own cache: fewer tokens computed
    cached = p.remote(_side("p", WorkerRole.PREFILL, cached=512), _side("d", WorkerRole.DECODE),
                      1000)
    assert cached.ttft_s > full.ttft_s - 0.03 and cached.ttft_s <= full.ttft_s


def test_a_kv_arriving_while_the_decode_worker_prefills_its_own_waits_for_that_step():
    p = Predictor(_profile())
    prefill = _side("p", WorkerRole.PREFILL)
    idle = p.remote(prefill, _side("d", WorkerRole.DECODE), 1000)
    assert idle.ttft_s == pytest.approx(0.111)  # as above: the KV is there at 0.111 s
    # the decode worker prefills 20,000 tokens of its own in one step of 0.21 s: the KV is
    # admitted at that step's end
    one = p.remote(prefill, _side("d", WorkerRole.DECODE, queued=20_000, chunk=20_000), 1000)
    assert one.ttft_s == pytest.approx(0.21)
    # in steps of 5,000 tokens (0.06 s each): at the end of the second
    steps = p.remote(prefill, _side("d", WorkerRole.DECODE, queued=20_000, chunk=5_000),
                     1000)
    assert steps.ttft_s == pytest.approx(0.12)
    # the same step begun 50 ms ago (this router sent its prompt then): 50 ms less
    begun = replace(_side("d", WorkerRole.DECODE, queued=20_000, chunk=20_000),
                    sent=((0.05, 20_000),))
    assert p.remote(prefill, begun, 1000).ttft_s == pytest.approx(0.16)
    # its own prompts done (0.03 s) before the KV arrives: no wait
    done = p.remote(prefill, _side("d", WorkerRole.DECODE, queued=1000), 1000)
    assert done.ttft_s == pytest.approx(idle.ttft_s)


def test_the_prompts_this_router_sent_count_less_what_the_worker_has_computed_since():
    p = Predictor(_profile())

    def side(sent, chunk=1000, queued=None):
        record = WorkerRecord("p", WorkerRole.PREFILL, "n", "", 16, 1000, 1000, 0, 0, 0, 0.0,
                              0.0, chunk_tokens=chunk)
        return Side(record, sum(n for _, n in sent) if queued is None else queued, 0, 0,
                    tuple(sent))

    # 1,000 tokens take one 0.03 s step: one sent 1 s ago is computed (its first token is
    # still on its way); the next, sent 20 ms ago, has run 20 ms of its step; the last
    # not begun
    assert p.queued(side([(1.0, 1000), (0.02, 1000), (0.0, 1000)])) == (2000,
                                                                        pytest.approx(0.02))
    # in steps of 500 (0.03 s each): sent 40 ms ago, the first step has ended
    assert p.queued(side([(0.04, 1000)], chunk=500)) == (500, pytest.approx(0.01))
    # sent together 50 ms ago: the second waited for the first, and is still in its step
    assert p.queued(side([(0.05, 1000), (0.05, 1000)])) == (1000, pytest.approx(0.02))
    # never less than the worker's report: it ran slower than the profile's pace
    slow = side([(1.0, 1000), (0.02, 1000), (0.0, 1000)])
    slow = replace(slow, record=replace(slow.record, queued_prefill_tokens=2500))
    assert p.queued(slow) == (2500, 0.0)
    # a queue the worker reported (not this router's count) is taken as it is
    assert p.queued(side([], queued=3000)) == (3000, 0.0)
    # a worker measured 2x slower than the profile: 40 ms is not yet its first step
    p.calibration.ttft.observe("p", 1.0, 2.0)
    assert p.queued(side([(0.04, 1000)], chunk=500)) == (1000, pytest.approx(0.04))
    # a local prompt behind 10,000 tokens whose step began 20 ms ago: 20 ms sooner than
    # behind the same queue reported (one step of 10,500 tokens, 0.115 s)
    fresh = Predictor(_profile())
    behind = side([(0.02, 10_000)], chunk=20_000)
    assert fresh.local(replace(behind, sent=()), 500).ttft_s == pytest.approx(0.115)
    assert fresh.local(behind, 500).ttft_s == pytest.approx(0.095)
    # what a remote prompt's prediction then sees: a prompt long computed costs nothing
    decode = _side("d", WorkerRole.DECODE)
    assert fresh.remote(side([(1.0, 1000)]), decode, 1000).ttft_s == pytest.approx(
        fresh.remote(side([]), decode, 1000).ttft_s)


def test_a_placement_walks_each_sides_ledger_once(monkeypatch):
    """Every (prefill, decode) pair of a placement predicts over the same sides: each
    side's queue is worked out from its ledger once, not once per pair; a side made
    again from it (`replace`) works out its own."""
    p = Predictor(_profile())
    walks = []
    walk = Predictor._queued
    monkeypatch.setattr(Predictor, "_queued",
                        lambda self, side, *a: walks.append(side.record.worker_id)
                        or walk(self, side, *a))

    def sent(wid, role):
        return replace(_side(wid, role, queued=2000), sent=((0.01, 1000), (0.0, 1000)))

    prefills = [sent(f"p{i}", WorkerRole.PREFILL) for i in range(3)]
    decodes = [sent(f"d{i}", WorkerRole.DECODE) for i in range(3)]
    placements = candidates(p, 500, prefills, decodes, decodes)
    assert len(placements) == 3 + 9
    assert sorted(walks) == sorted(["p0", "p1", "p2"] + ["d0", "d1", "d2"])
    more = replace(prefills[0], queued_tokens=5000)
    assert p.queued(prefills[0])[0] == 2000
    assert p.queued(more)[0] == 5000  # not the memo of the side it was made from
    assert walks.count("p0") == 2


def test_tpot_grows_with_the_batch_and_its_kv():
    p = Predictor(_profile())
    assert p.tpot_s(_side("d", WorkerRole.DECODE), 10) == pytest.approx(0.01 + 0.02 + 1e-3)
    busy = p.tpot_s(_side("d", WorkerRole.DECODE, batch=40), 10)
    assert busy == pytest.approx(0.01 + 0.02 + 41e-3)


def test_short_prompts_stay_local_long_ones_go_remote_when_the_decoder_is_busy():
    p = Predictor(_profile(latency_s=0.05, bytes_per_s=1e9))
    prefill = _side("p", WorkerRole.PREFILL)
    decode = _side("d", WorkerRole.DECODE, batch=30, used_blocks=200)
    slo = Slo(ttft_s=1.0, tpot_s=0.2)
    short = choose(candidates(p, 32, [prefill], [decode], [decode]), slo)
    assert short is not None and not short.disaggregated  # the transfer's 50 ms dominate
    long = choose(candidates(p, 8000, [prefill], [decode], [decode]), slo)
    assert long is not None and long.disaggregated  # 9 mixed steps carry 30 decodes each
    assert long.prefill_id == "p" and long.decode_id == "d"


def test_choose_prefers_meeting_both_slos_then_the_most_headroom():
    slo = Slo(ttft_s=1.0, tpot_s=0.1)
    fast_but_slow_tokens = Placement("a", "", Prediction(0.1, 0.2))
    meets = Placement("b", "p", Prediction(0.8, 0.05))
    roomy = Placement("c", "p", Prediction(0.5, 0.04))
    assert choose([fast_but_slow_tokens, meets], slo).decode_id == "b"
    assert choose([fast_but_slow_tokens, meets, roomy], slo).decode_id == "c"
    # none meets: the one that misses by least
    assert choose([Placement("x", "", Prediction(3.0, 0.05)),
                   Placement("y", "", Prediction(1.5, 0.05))], slo).decode_id == "y"
    # no SLO at all: the earliest first token
    assert choose([meets, roomy], Slo(None, None)).decode_id == "c"
    assert choose([], slo) is None


def test_equal_headroom_goes_to_the_placement_that_stalls_the_batch_least():
    """Both bound by the same TPOT term on one decode worker: the local prefill's faster
    first token does not buy the batch's slack."""
    slo = Slo(10.0, 0.1)
    local = Placement("d", "", Prediction(0.5, 0.08, 0.2, others_tpot_ratio=0.7))
    remote = Placement("d", "p", Prediction(1.5, 0.08))
    assert choose([local, remote], slo) is remote
    assert choose([local, Placement("d", "p", Prediction(9.0, 0.08))], slo) is local
    quiet = Placement("d", "", Prediction(0.5, 0.08, 0.2))  # nobody decoding to stall
    assert choose([quiet, remote], slo) is quiet


def test_candidates_pair_the_best_workers_and_every_cache_holder():
    p = Predictor(_profile())
    prefills = [_side(f"p{i}", WorkerRole.PREFILL, queued=1000 * i) for i in range(10)]
    prefills.append(_side("p-hit", WorkerRole.PREFILL, queued=50_000, cached=1024))
    decodes = [_side(f"d{i}", WorkerRole.DECODE, batch=i) for i in range(10)]
    out = candidates(p, 2000, prefills, decodes, [], width=2)
    pairs = {(c.prefill_id, c.decode_id) for c in out}
    assert pairs == {(pw, dw) for pw in ("p0", "p1", "p-hit") for dw in ("d0", "d1")}


def test_a_workers_measured_decode_step_scales_the_profiles_within_bounds():
    p = Predictor(_profile())

    def side(measured: float) -> Side:
        record = WorkerRecord("d", WorkerRole.DECODE, "n", "", 16, 1000, 1000, 10, 0, 0, 0.0,
                              0.0, decode_step_s=measured, chunk_tokens=1000)
        return Side(record, 0, 10)

    profile_step = 0.01 + 0.02 + 10e-3  # the profile's step for the reported batch of 10
    assert p.decode_scale(side(0.0)) == 1.0  # not measured yet
    assert p.decode_scale(side(1.5 * profile_step)) == pytest.approx(1.5)
    assert p.tpot_s(side(1.5 * profile_step), 10) == pytest.approx(
        1.5 * (0.01 + 0.02 + 11e-3))
    idle = Side(replace(side(1.5 * profile_step).record, running=0), 0, 0)
    assert p.decode_scale(idle) == pytest.approx(1.5)  # its last measured ratio
    assert p.decode_scale(side(100 * profile_step)) == SCALE_BOUNDS[1]  # a glitch: bounded
    assert p.decode_scale(side(profile_step / 100)) == SCALE_BOUNDS[0]


def test_a_workers_measured_prefill_stall_adds_to_the_tpot_it_predicts():
    p = Predictor(_profile())
    quiet = _side("d", WorkerRole.COLOCATED)
    stalled = Side(replace(quiet.record, prefill_stall_s=0.05), 0, quiet.batch)
    assert p.tpot_s(stalled, 10) == pytest.approx(p.tpot_s(quiet, 10) + 0.05)
    assert p.local(stalled, 10).tpot_s == pytest.approx(p.local(quiet, 10).tpot_s + 0.05)


def test_a_local_prefill_pays_for_the_time_it_adds_to_decodes_without_a_tpot_slo():
    """No TPOT SLO protects the batch: the stall a local prefill adds to each request
    decoding there counts as the placement's first-token time, so a first token a little
    sooner does not cost the whole batch a prefill's time."""
    # prompt tokens ten times dearer than STEP's: a prompt's chunk outweighs the decodes
    p = Predictor(replace(_profile(latency_s=0.05, bytes_per_s=1e9),
                          step=replace(STEP, token_s=1e-4)))
    prefill = _side("p", WorkerRole.PREFILL)
    decode = _side("d", WorkerRole.DECODE, batch=8)

    def placed(slo, unprotected=None):
        return choose(candidates(p, 2000, [prefill], [decode], [decode],
                                 unprotected=unprotected), slo)

    for slo in (Slo(None, None), Slo(30.0, None)):
        assert not placed(slo).disaggregated  # the transfer's 50 ms saved, the batch ignored
        assert placed(slo, lambda s: s.batch).disaggregated
        assert not placed(slo, lambda s: 0).disaggregated  # nothing decoding unprotected
    (local,) = [c for c in candidates(p, 2000, [prefill], [decode], [decode],
                                      unprotected=lambda s: 8) if not c.disaggregated]
    assert local.prediction.stall_s > 0
    assert local.prediction.others_delay_s == pytest.approx(8 * local.prediction.stall_s)


def test_the_delay_charged_for_unprotected_decodes_ranks_placements_but_is_no_slo():
    slo = Slo(ttft_s=1.0, tpot_s=None)
    local = Prediction(0.5, 0.05, stall_s=0.2, others_delay_s=2.0)
    assert slo.headroom(local) < 0  # ranked as a 2.5 s first token
    assert slo.met(local)  # its own first token, 0.5 s, is within the SLO
    assert not slo.met(replace(local, ttft_s=1.5))
