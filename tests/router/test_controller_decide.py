"""The controller's rule (router.controller.decide) on synthetic snapshots: it moves toward
the side under pressure, never flaps under noise inside its band, waits out dwell times
and cool-downs, one move at a time, and never leaves the cluster unable to decode (a
decode worker prefills locally what no prefill worker takes)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pdserve.protocol import WorkerRole, WorkerState
from pdserve.router.controller.decide import (
    ControllerConfig,
    RouterSignals,
    Snapshot,
    WorkerInfo,
    decide,
    pressures,
)

P, D, C = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED
CONFIG = ControllerConfig(dwell_s=30, cooldown_s=10, ttft_target_s=2.0, batch_cap=10)
NOW = 1_000.0


def worker(wid, role, adaptive=True, **kw) -> WorkerInfo:
    kw.setdefault("prefill_tokens_per_s", 100.0)
    kw.setdefault("total_blocks", 100)
    kw.setdefault("free_blocks", 100)
    return WorkerInfo(wid, role, adaptive=adaptive, role_since=NOW - 100, **kw)


def cluster(prefill_queue=0, decode_running=0, **signals) -> Snapshot:
    """Two static workers (P, D) and three adaptive ones (P, D, D), loaded as asked."""
    workers = (worker("p0", P, adaptive=False, queued_prefill_tokens=prefill_queue),
               worker("a0", P, queued_prefill_tokens=prefill_queue),
               worker("d0", D, adaptive=False, running=decode_running),
               worker("a1", D, running=decode_running),
               worker("a2", D, running=max(0, decode_running - 1)))
    return Snapshot(NOW, workers, RouterSignals(**signals))


def test_long_prefill_queues_move_a_decode_worker_to_prefill():
    decision = decide(cluster(prefill_queue=400, decode_running=1), CONFIG)
    (move,) = decision.moves
    assert (move.from_role, move.to_role) == (D, P)
    assert move.worker_id == "a2"  # the least loaded decode worker goes
    assert decision.targets == {"a0": P, "a1": D, "a2": P}
    assert "prefill pressure" in move.reason


def test_saturated_decode_batches_move_a_prefill_worker_to_decode():
    decision = decide(cluster(prefill_queue=0, decode_running=10), CONFIG)
    (move,) = decision.moves
    assert (move.worker_id, move.from_role, move.to_role) == ("a0", P, D)


def test_tpot_misses_count_as_decode_pressure_and_ttft_misses_as_prefill():
    tpot = decide(cluster(tpot_requests=20, tpot_misses=5), CONFIG)
    assert [m.to_role for m in tpot.moves] == [D]
    ttft = decide(cluster(ttft_requests=20, ttft_misses=5), CONFIG)
    assert [m.to_role for m in ttft.moves] == [P]
    refusals = decide(cluster(finished=10, refused=5), CONFIG)
    assert [m.to_role for m in refusals.moves] == [P]
    # refused for the decode batch they would join: the decode side lacks a worker
    slow_batch = decide(cluster(finished=10, refused=5, refused_decode=5), CONFIG)
    assert [m.to_role for m in slow_batch.moves] == [D]
    assert pressures(cluster(finished=10, refused=5, refused_decode=5), CONFIG).prefill == 0


def test_both_sides_under_pressure_or_neither_moves_nobody():
    assert not decide(cluster(prefill_queue=400, decode_running=10), CONFIG).moves
    assert not decide(cluster(prefill_queue=20, decode_running=1), CONFIG).moves


def test_a_side_far_past_its_edge_takes_a_worker_from_one_inside_the_band():
    # one refusal for prompt work among the requests that ended holds the prefill side
    # inside the band, while most were refused for the decode batch they would join
    far = Snapshot(NOW, (worker("a0", P), worker("a1", D)),
                   RouterSignals(finished=16, refused=6, refused_decode=5))
    p = pressures(far, CONFIG)
    assert CONFIG.low < p.prefill < CONFIG.high and p.decode >= CONFIG.dominance * p.prefill
    (move,) = decide(far, CONFIG).moves
    assert (move.worker_id, move.from_role, move.to_role) == ("a0", P, D)
    assert "decode pressure" in move.reason
    # past the edge, but not by `dominance` times the other side: the band holds
    near = cluster(finished=16, refused=3, refused_decode=2)
    p = pressures(near, CONFIG)
    assert p.decode >= CONFIG.high and p.decode < CONFIG.dominance * p.prefill
    assert not decide(near, CONFIG).moves
    # a side at or above `high` never gives a worker, however far the other is past it
    both = cluster(finished=6, refused=8, refused_decode=6)
    p = pressures(both, CONFIG)
    assert p.prefill >= CONFIG.high and p.decode >= CONFIG.dominance * p.prefill
    assert not decide(both, CONFIG).moves


def test_no_move_leaves_the_giving_side_past_its_edge():
    # two decode workers at 0.5 each; refusals for the stall of local prefills ask for a
    # prefill worker, but one decoder left would be at 1.0: the shortage only moves
    def two_decoders(step_s):
        return Snapshot(NOW, (worker("a0", D, running=3, decode_step_s=step_s),
                              worker("a1", D, running=3, decode_step_s=step_s)),
                        RouterSignals(finished=16, refused=4, tpot_requests=16,
                                      tpot_slo_ms_sum=16 * 100))
    busy = two_decoders(0.05)
    p = pressures(busy, CONFIG)
    assert p.prefill >= CONFIG.high and p.decode == pytest.approx(0.5)
    decision = decide(busy, CONFIG)
    assert not decision.moves and "1.00 with one worker fewer" in decision.why
    # at 0.3 each, one decoder can take the batch: the move is made
    (move,) = decide(two_decoders(0.03), CONFIG).moves
    assert move.to_role is P
    # the same for the prefill side of several prefill workers (the second static one
    # counts): 0.45 x 2 would be past the edge
    decision = decide(cluster(finished=16, refused=6, refused_decode=5), CONFIG)
    assert not decision.moves and "0.91 with one worker fewer" in decision.why


def test_noise_inside_the_band_never_flaps():
    rng = random.Random(0)
    moves = 0
    for _ in range(500):
        # prefill pressure wanders around 0.55, decode around 0.5: between low and high
        snap = cluster(prefill_queue=int(110 * rng.uniform(0.8, 1.2)),
                       decode_running=rng.choice([4, 5, 6]))
        p = pressures(snap, CONFIG)
        assert CONFIG.low < p.prefill < CONFIG.high and CONFIG.low < p.decode < CONFIG.high
        moves += len(decide(snap, CONFIG).moves)
    assert moves == 0


def test_a_worker_keeps_its_role_for_the_dwell_time():
    snap = cluster(prefill_queue=400)
    young = tuple(replace(w, role_since=NOW - 5) if w.adaptive else w for w in snap.workers)
    decision = decide(replace(snap, workers=young), CONFIG)
    assert not decision.moves and "dwell" in decision.why


def test_no_move_during_a_cool_down_or_while_a_switch_is_under_way():
    snap = cluster(prefill_queue=400)
    assert not decide(replace(snap, last_switch=NOW - 3), CONFIG).moves
    draining = tuple(replace(w, state=WorkerState.DRAINING) if w.worker_id == "a1" else w
                     for w in snap.workers)
    assert decide(replace(snap, workers=draining), CONFIG).why == "a switch is under way"
    pending = tuple(replace(w, target=P) if w.worker_id == "a1" else w for w in snap.workers)
    decision = decide(replace(snap, workers=pending), CONFIG)
    assert not decision.moves and decision.targets["a1"] is P


def test_two_workers_move_between_1p1d_and_two_decode_workers():
    # saturated decode, idle prefill: the prefill worker decodes too (each then prefills
    # its own prompts, as colocated workers do)
    workers = (worker("a0", P, queued_prefill_tokens=0), worker("a1", D, running=10))
    (move,) = decide(Snapshot(NOW, workers), CONFIG).moves
    assert (move.worker_id, move.from_role, move.to_role) == ("a0", P, D)
    # two decode workers whose local prefill queues grew: one becomes a prefill worker
    workers = (worker("a0", D, queued_prefill_tokens=300), worker("a1", D,
                                                                  queued_prefill_tokens=300))
    (move,) = decide(Snapshot(NOW, workers), CONFIG).moves
    assert move.to_role is P
    # the last decoder never goes, however long the prompts' queue
    workers = (worker("a0", P, queued_prefill_tokens=900), worker("a1", D))
    decision = decide(Snapshot(NOW, workers), CONFIG)
    assert not decision.moves and "last of its kind" in decision.why


def test_a_lone_prefill_worker_kept_busy_between_prompts_stays_a_prefill_worker():
    # summarize-like: no prompt queued at this instant, the decode batch near its edge
    # (0.8); prompts kept the prefill worker busy 75% of the window (100 tokens/s x 30 s)
    workers = (worker("a0", P, queued_prefill_tokens=0), worker("a1", D, running=8))
    busy = Snapshot(NOW, workers, RouterSignals(prompt_tokens=int(0.75 * 100 * 30)))
    decision = decide(busy, CONFIG)
    assert pressures(busy, CONFIG).prefill == pytest.approx(0.75)
    assert not decision.moves and decision.why == "pressures within the band"
    # the same batch beside a prefill worker idle most of the window: it goes to decode
    idle = Snapshot(NOW, workers, RouterSignals(prompt_tokens=int(0.1 * 100 * 30)))
    (move,) = decide(idle, CONFIG).moves
    assert (move.worker_id, move.to_role) == ("a0", D)


def test_a_colocated_worker_moves_only_while_others_decode():
    lone = (worker("a0", C, queued_prefill_tokens=900),)
    assert not decide(Snapshot(NOW, lone), CONFIG).moves
    with_decode = (worker("a0", C, queued_prefill_tokens=900), worker("d0", D, adaptive=False))
    (move,) = decide(Snapshot(NOW, with_decode), CONFIG).moves
    assert (move.worker_id, move.to_role) == ("a0", P)


def test_static_workers_are_never_moved():
    workers = (worker("p0", P, adaptive=False, queued_prefill_tokens=900),
               worker("d0", D, adaptive=False), worker("d1", D, adaptive=False))
    decision = decide(Snapshot(NOW, workers), CONFIG)
    assert not decision.moves and decision.why == "no adaptive worker"


def test_a_bad_band_is_refused():
    with pytest.raises(ValueError, match="low < high"):
        ControllerConfig(low=0.8, high=0.5)
    with pytest.raises(ValueError, match="dominance"):
        ControllerConfig(dominance=1.0)


def test_pressures_are_judged_by_the_slos_the_requests_ask_for():
    # 800 queued tokens on two prefill workers at 100 tokens/s each: a 4 s wait, 2x the
    # 2 s fallback target, but well inside a 10 s TTFT SLO
    assert pressures(cluster(prefill_queue=400), CONFIG).prefill == pytest.approx(2.0)
    asked = {"ttft_requests": 4, "ttft_slo_ms_sum": 40_000}
    assert pressures(cluster(prefill_queue=400, **asked), CONFIG).prefill == \
        pytest.approx(0.4)
    # decode workers stepping at 90% of the TPOT SLO are full, whatever their batch
    slow = Snapshot(NOW, (worker("a0", P), worker("a1", D, running=3, decode_step_s=0.09)),
                    RouterSignals(tpot_requests=2, tpot_slo_ms_sum=200))
    assert pressures(slow, CONFIG).decode == pytest.approx(0.9)
    assert [m.to_role for m in decide(slow, CONFIG).moves] == [D]
    # without a TPOT SLO: its batch over batch_cap
    assert pressures(replace(slow, routers=RouterSignals()), CONFIG).decode == \
        pytest.approx(0.3)


def test_ttft_misses_spent_waiting_for_the_decode_side_are_decode_pressure():
    misses = {"ttft_requests": 20, "ttft_misses": 5}
    assert [m.to_role for m in decide(cluster(**misses), CONFIG).moves] == [P]
    decode_side = decide(cluster(**misses, ttft_misses_decode=5), CONFIG)
    assert [m.to_role for m in decode_side.moves] == [D]


def test_tpot_misses_split_as_the_decoding_workers_time_per_token_is():
    misses = RouterSignals(tpot_requests=20, tpot_misses=5)
    # decode-bound steps: the misses are the decode side's
    plain = Snapshot(NOW, (worker("a0", P), worker("a1", D, running=3, decode_step_s=0.1)),
                     misses)
    assert [m.to_role for m in decide(plain, CONFIG).moves] == [D]
    # nine tenths of each token's time is the prompts it prefills locally: more decode
    # workers would not help; that share goes to prefill pressure
    stalled = Snapshot(NOW, (worker("a0", C), worker("a1", C, running=3, decode_step_s=0.1,
                                                         prefill_stall_s=0.9)), misses)
    p = pressures(stalled, CONFIG)
    assert p.prefill == pytest.approx(2.5 * 0.9) and p.decode == pytest.approx(0.25)
    assert [m.to_role for m in decide(stalled, CONFIG).moves] == [P]
