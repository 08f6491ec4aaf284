"""The KVs on their way to a decode worker (router.incoming): a local prefill placed on
that worker delays each one that arrives during its steps, and placement charges that
delay, so a local prefill that would push a remote request past its TTFT SLO loses to a
remote placement."""

from __future__ import annotations

import time

import pytest

from pdserve.protocol import CostProfile, StepModel, TransferModel, WorkerRecord, WorkerRole
from pdserve.router.incoming import IncomingBook
from pdserve.router.placement import Slo, candidates, choose
from pdserve.router.predict import Prediction, Predictor, Side

# one step: 10 ms + 10 us per token (at least 20 ms); nothing else
PROFILE = CostProfile("measured", {}, {"layers": 10}, kv_bytes_per_token=100,
                      kv_capacity_tokens=100_000,
                      step=StepModel(base_s=0.01, floor_s=0.02, token_s=1e-5, pair_s=0.0,
                                     context_s=0.0, seq_s=0.0),
                      transfer=TransferModel(0.001, 1e6))


def _decode(chunk: int = 20_000) -> Side:
    return Side(WorkerRecord("d", WorkerRole.DECODE, "n", "", 16, 1000, 1000, 0, 0, 0, 0.0,
                             0.0, chunk_tokens=chunk), 0, 0)


def test_a_kv_due_during_a_local_prefills_step_waits_for_its_end():
    book, p = IncomingBook(), Predictor(PROFILE)
    now = time.time()
    # arrived 50 ms ago with a 200 ms TTFT SLO; first token due in 50 ms: at 0.5 of it
    book.expect("d", "kv", since=now - 0.05, first_token_at=now + 0.05,
                deadline=now + 0.15)
    assert book.others_ratio(p, _decode(), 100) == pytest.approx(0.5, abs=0.01)
    # 20,000 tokens prefilled there now: one 0.21 s step, which the KV waits out
    assert book.others_ratio(p, _decode(), 20_000) == pytest.approx(0.26 / 0.2, abs=0.01)
    # in steps of 2,000 (30 ms): the KV waits for the step in progress at 50 ms
    assert book.others_ratio(p, _decode(chunk=2_000), 20_000) == pytest.approx(
        0.11 / 0.2, abs=0.01)
    # another worker has nothing on its way; the KV's first token came: nothing left
    other = Side(WorkerRecord("e", WorkerRole.DECODE, "n", "", 16, 1000, 1000, 0, 0, 0, 0.0,
                              0.0, chunk_tokens=20_000), 0, 0)
    assert book.others_ratio(p, other, 20_000) == 0.0
    assert len(book) == 1
    book.arrived("d", "kv")
    book.arrived("d", "kv")  # idempotent
    assert len(book) == 0
    assert book.others_ratio(p, _decode(), 20_000) == 0.0


def test_one_already_due_or_past_its_slo_is_left_out():
    book = IncomingBook()
    now = time.time()
    book.expect("d", "due", since=now - 1.0, first_token_at=now - 0.1, deadline=now + 1.0)
    book.expect("d", "lost", since=now - 1.0, first_token_at=now + 2.0, deadline=now + 1.0)
    assert book.worst_ratio("d", lambda due: 10.0, now) == 0.0
    book.expect("d", "kept", since=now, first_token_at=now + 0.5, deadline=now + 1.0)
    assert book.worst_ratio("d", lambda due: 0.25, now) == pytest.approx(0.75)


def test_a_local_prefill_that_would_make_a_kv_miss_loses_to_the_remote_placement():
    p = Predictor(PROFILE)
    prefill = Side(WorkerRecord("p", WorkerRole.PREFILL, "n", "", 16, 1000, 1000, 0, 0, 0,
                                0.0, 0.0, chunk_tokens=20_000), 0, 0)
    slo = Slo(ttft_s=1.0, tpot_s=None)
    quiet = candidates(p, 2000, [prefill], [_decode()], [_decode()])
    assert not choose(quiet, slo).disaggregated  # local: no transfer, the sooner token
    late = candidates(p, 2000, [prefill], [_decode()], [_decode()],
                      incoming=lambda side, prompt: 1.3)
    local = next(c for c in late if not c.disaggregated)
    assert local.prediction.others_ttft_ratio == 1.3
    assert choose(late, slo).disaggregated
    assert slo.headroom(local.prediction) == pytest.approx(-0.3)
    assert slo.headroom(Prediction(0.5, 0.0, others_ttft_ratio=0.9)) == pytest.approx(0.1)
