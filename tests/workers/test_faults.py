"""Kills and aborts across worker processes: every job ends in bounded time and every
worker, prefill and decode, is left with all blocks free and no job; a prefill job whose
decode worker died keeps its KV for a re-send.

The prefill worker here runs one token per step and one sequence at a time, so a 400-token
prompt takes four hundred steps: long enough to act while it is in a given state.
To hold a job in the prefill worker's TRANSFERRING state (first token sent, waiting for
the receiver's acknowledgement), the decode worker is stopped (SIGSTOP) while the prefill
finishes: its KV and Done wait in the socket until it runs again, or dies."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from driver import reserve, run_disaggregated, submit
from helpers import greedy, wait_for
from worker_driver import wait_idle, wait_state
from worker_procs import slow_prefill_config, spawn, stop_all, worker_config

from pdserve.decode_worker import DecodeState
from pdserve.engine import LLM
from pdserve.prefill_worker import PrefillState
from pdserve.protocol import (
    DecodeOrder,
    FinishReason,
    PrefillOrder,
    PrefillStatus,
    Reservation,
    WorkerRole,
)

LONG = tuple((i * 37) % 251 for i in range(400))
SHORT = (5, 6, 7, 8, 9)


def uncached_long(seed: int) -> tuple[int, ...]:
    """A 400-token prompt no other test sends: no prefix-cache hit shortens its prefill."""
    return tuple((i * 37 + seed * 101) % 251 for i in range(400))


@pytest.fixture(scope="module")
def procs(tiny_llama_dir):
    procs = spawn([slow_prefill_config(tiny_llama_dir, "p-slow"),
                   worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-main")])
    yield procs
    stop_all(procs)


@pytest.fixture(scope="module")
def decode(procs):
    return procs[1]


@pytest.fixture(scope="module")
def short_expected(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=4).generate([list(SHORT)], greedy(6))[0].token_ids


@pytest.fixture(autouse=True)
def no_leaks(prefill, decode):
    yield
    wait_idle(prefill)
    wait_idle(decode.worker)


def start(collector, prefill, decode, tid, prompt=LONG, params=None, lease_s=30.0,
          deadline=None) -> None:
    """Reserve on `decode` and submit to `prefill`; both return at once."""
    params = params or greedy(4)
    submit(collector, prefill, tid, prompt, params,
           reserve(collector, decode, tid, prompt, params, lease_s, deadline=deadline),
           deadline)


@contextlib.contextmanager
def stopped(proc):
    """The process frozen (SIGSTOP) until the block ends (SIGCONT, unless it was killed)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if proc.process.is_alive():
            os.kill(proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def long_expected(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=4).generate([list(LONG)], greedy(4))[0].token_ids


def resend(collector, prefill, decode, old: str, new: str, prompt=LONG, params=None) -> bool:
    """Reserve on `decode` under `new` and order the prefill worker to re-send `old`'s KV
    there; whether it took the held job."""
    params = params or greedy(4)
    reservation = reserve(collector, decode, new, prompt, params)
    return prefill.submit(PrefillOrder(new, tuple(prompt), params, reservation.kv_endpoint,
                                       collector.endpoint, resend_of=old,
                                       kv_start=reservation.num_cached_tokens))


def test_decode_worker_killed_mid_transfer_the_kv_is_resent_without_recompute(
        tiny_llama_dir, collector, prefill, decode, long_expected, short_expected):
    """The decode worker dies while the layers stream: the prefill job reports HELD, goes on
    computing, and a re-send order moves it to another decode worker, which gets every
    layer (the ones sent before the death again, from the blocks) and decodes the output
    an undisturbed run gives. The prefill ran once."""
    (victim,) = spawn([worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-victim")])
    try:
        start(collector, prefill, victim.worker, "kill-d")
        wait_state(victim.worker, "kill-d", DecodeState.RECEIVING)
        victim.kill()
        held = collector.wait_outcome("kill-d", timeout=30)
        assert held.status is PrefillStatus.HELD
        assert "disconnected" in held.reason  # the dropped connection, not a timeout
    finally:
        stop_all([victim])  # dead on purpose: no longer a worker that died under a test
    assert resend(collector, prefill, decode.worker, "kill-d", "kill-d-2")
    streamed = collector.wait_final("kill-d-2", timeout=60)
    assert streamed.final.error == "" and streamed.token_ids == long_expected
    done = collector.wait_outcome("kill-d-2")
    assert done.status is PrefillStatus.DONE
    assert done.stamps.prefill_start == held.stamps.prefill_start  # computed once
    wait_idle(prefill)
    # the prefill worker carries on with other decode workers
    out = run_disaggregated(collector, prefill, decode.worker, "after-kill-d", SHORT, greedy(6))
    assert out.token_ids == short_expected


def test_decode_worker_killed_while_the_prefill_waits_for_its_ack(tiny_llama_dir, collector,
                                                                 prefill, decode, long_expected):
    """Killed once every layer went out: the job holds its whole KV, and the re-send goes
    out from the blocks at once."""
    (victim,) = spawn([worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-victim-2")])
    prompt = uncached_long(3)
    try:
        start(collector, prefill, victim.worker, "kill-d-ack", prompt)
        wait_state(victim.worker, "kill-d-ack", DecodeState.RECEIVING)
        with stopped(victim):
            wait_state(prefill, "kill-d-ack", PrefillState.TRANSFERRING)
            victim.kill()
        held = collector.wait_outcome("kill-d-ack", timeout=30)
        assert held.status is PrefillStatus.HELD
        assert "disconnected" in held.reason or "acknowledgement" in held.reason
        assert held.stamps.prefill_end > 0  # the prefill had ended
    finally:
        stop_all([victim])  # dead on purpose: no longer a worker that died under a test
    want = LLM(str(tiny_llama_dir), block_size=4).generate([list(prompt)],
                                                          greedy(4))[0].token_ids
    assert resend(collector, prefill, decode.worker, "kill-d-ack", "kill-d-ack-2", prompt)
    streamed = collector.wait_final("kill-d-ack-2", timeout=60)
    assert streamed.final.error == "" and streamed.token_ids == want
    assert collector.wait_outcome("kill-d-ack-2").stamps.prefill_end == held.stamps.prefill_end


def test_a_held_job_no_order_claims_ends_by_itself(tiny_llama_dir, collector, prefill):
    """No re-send comes (the router died, or served the request elsewhere): the held KV is
    freed `hold_s` after the prefill ended (the autouse check sees every block free)."""
    (victim,) = spawn([worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-victim-3")])
    try:
        start(collector, prefill, victim.worker, "unclaimed", uncached_long(4))
        wait_state(victim.worker, "unclaimed", DecodeState.RECEIVING)
        with stopped(victim):
            wait_state(prefill, "unclaimed", PrefillState.TRANSFERRING)
            victim.kill()
        assert collector.wait_outcome("unclaimed", timeout=30).status is PrefillStatus.HELD
    finally:
        stop_all([victim])  # dead on purpose: no longer a worker that died under a test
    assert prefill.job_state("unclaimed") is PrefillState.HELD
    wait_for(lambda: prefill.load().num_leases == 1, 5, "the held KV in the load report")
    wait_idle(prefill)  # within hold_s


def test_a_resend_of_a_job_not_held_computes_the_prompt(collector, prefill, decode,
                                                         short_expected):
    """`resend_of` is a request, not a promise: naming a job that is not here (it ended, or
    another order took it) queues the prompt as a new job."""
    assert not resend(collector, prefill, decode.worker, "never-was", "fresh", SHORT,
                      greedy(6))
    assert collector.wait_final("fresh", timeout=60).token_ids == short_expected
    assert collector.wait_outcome("fresh").status is PrefillStatus.DONE


def test_prefill_worker_killed_mid_transfer(tiny_llama_dir, collector, decode):
    (victim,) = spawn([slow_prefill_config(tiny_llama_dir, "p-victim")])
    try:
        # uncached on the decode side too: with LONG in its prefix cache (an earlier test
        # decoded it there) only the last tokens would travel, at the prefill's very end
        start(collector, victim.worker, decode.worker, "kill-p", uncached_long(6),
              lease_s=4.0)
        wait_state(decode.worker, "kill-p", DecodeState.RECEIVING)
        victim.kill()
    finally:
        stop_all([victim])  # dead on purpose: no longer a worker that died under a test
    final = collector.wait_final("kill-p", timeout=15).final  # the lease expires
    assert final.finish is FinishReason.ERROR
    assert "lease expired" in final.error


def test_a_lease_with_no_prefill_expires(collector, decode):
    decode.worker.reserve(DecodeOrder("orphan", LONG, greedy(4), collector.endpoint,
                                      lease_s=0.3))
    final = collector.wait_final("orphan", timeout=10).final
    assert final.finish is FinishReason.ERROR and final.stamps.kv_received == 0.0


def test_a_refused_prefill_order_is_reported_and_holds_nothing(collector, prefill, decode):
    """A transfer id already live on the prefill worker: the second order fails alone."""
    # uncached: LONG is in the prefix cache once an earlier test's prefill of it completed,
    # and a cached prompt is prefilled in one step, too fast to act on it while it runs
    prompt = uncached_long(5)
    start(collector, prefill, decode.worker, "twice", prompt)
    wait_state(prefill, "twice", PrefillState.PREFILLING)
    submit(collector, prefill, "twice", prompt, greedy(4),
           Reservation(decode.worker.kv_endpoint()))
    outcome = collector.wait_outcome("twice")
    assert outcome.status is PrefillStatus.FAILED and "already in use" in outcome.reason
    prefill.abort("twice")
    decode.worker.abort("twice")
    collector.wait_final("twice")


def test_a_job_queued_longer_than_its_lease_keeps_its_reservation(collector, prefill, decode,
                                                                 short_expected):
    """The lease measures the prefill side's silence, not its queue: a job that waits behind
    a long prefill for several of its leases (its sender renewing it) is served in full."""
    # two 400-token prompts ahead, one token a step: several of its leases however fast
    # the machine is
    blockers = ("lease-blocker-1", "lease-blocker-2")
    for seed, tid in zip((1, 8), blockers, strict=True):
        start(collector, prefill, decode.worker, tid, uncached_long(seed))
    wait_state(prefill, blockers[0], PrefillState.PREFILLING)
    start(collector, prefill, decode.worker, "patient", SHORT, greedy(6), lease_s=0.4)
    streamed = collector.wait_final("patient", timeout=60)
    assert streamed.final.error == "" and streamed.token_ids == short_expected
    stamps = collector.wait_outcome("patient").stamps
    assert stamps.prefill_start - stamps.received > 0.4  # it waited past its lease
    for tid in blockers:
        collector.wait_outcome(tid, timeout=60)
        collector.wait_final(tid, timeout=60)


def test_a_job_whose_deadline_passes_while_queued_never_prefills(collector, prefill, decode):
    start(collector, prefill, decode.worker, "deadline-blocker", uncached_long(2))
    wait_state(prefill, "deadline-blocker", PrefillState.PREFILLING)
    start(collector, prefill, decode.worker, "too-late", SHORT, greedy(6),
          deadline=time.time() + 0.2)
    outcome = collector.wait_outcome("too-late", timeout=30)
    assert outcome.status is PrefillStatus.ABORTED and "deadline" in outcome.reason
    assert outcome.stamps.prefill_start == 0.0  # dropped before its prefill ran
    final = collector.wait_final("too-late").final
    assert final.finish in (FinishReason.ABORT, FinishReason.ERROR)
    assert prefill.job_state("deadline-blocker") is PrefillState.PREFILLING  # still running
    prefill.abort("deadline-blocker")
    decode.worker.abort("deadline-blocker")
    collector.wait_outcome("deadline-blocker")
    collector.wait_final("deadline-blocker")


def test_orders_that_arrive_expired_hold_nothing_and_run_nothing(collector, prefill, decode):
    past = time.time() - 1.0
    start(collector, prefill, decode.worker, "expired", LONG, greedy(4), deadline=past)
    outcome = collector.wait_outcome("expired")
    assert outcome.status is PrefillStatus.ABORTED and outcome.stamps.prefill_start == 0.0
    assert collector.wait_final("expired").final.finish in (FinishReason.ABORT,
                                                            FinishReason.ERROR)
    decode.worker.generate(DecodeOrder("expired-local", SHORT, greedy(4), collector.endpoint,
                                       deadline=past))
    final = collector.wait_final("expired-local")
    assert final.token_ids == [] and final.final.finish is FinishReason.ABORT


@pytest.mark.parametrize("state", ["queued", "prefilling", "transferring", "decoding"])
def test_abort_in_each_state_frees_both_sides(state, collector, prefill, decode):
    tid = f"abort-{state}"
    if state == "queued":  # one sequence at a time: a long job ahead keeps it queued
        start(collector, prefill, decode.worker, "blocker")
        wait_state(prefill, "blocker", PrefillState.PREFILLING)
    params = greedy(400, ignore_eos=True) if state == "decoding" else greedy(4)
    # uncached: a prefix-cache hit would end the prefill before the test can act on it
    prompt = SHORT if state == "decoding" else uncached_long(10 + len(state))
    start(collector, prefill, decode.worker, tid, prompt, params)
    if state == "queued":
        try:
            wait_state(prefill, tid, PrefillState.QUEUED)
        except AssertionError as e:
            streams = {t: collector.streams.get(t) for t in (tid, "blocker")}
            raise AssertionError(f"{e}; streams: {streams}") from None
    elif state == "prefilling":
        wait_state(prefill, tid, PrefillState.PREFILLING)
    elif state == "transferring":
        wait_state(decode.worker, tid, DecodeState.RECEIVING)
        with stopped(decode):  # no ack can come: the prefill job stays TRANSFERRING
            wait_state(prefill, tid, PrefillState.TRANSFERRING)
            prefill.abort(tid)
            outcome = collector.wait_outcome(tid)
    else:
        wait_state(decode.worker, tid, DecodeState.DECODING)
    prefill.abort(tid)  # idempotent: a second abort, or one after the end, does nothing
    decode.worker.abort(tid)
    outcome = collector.wait_outcome(tid, timeout=30)
    if state == "decoding":
        # the prefill had ended; its worker may not have read the ack before the abort came
        assert outcome.status in (PrefillStatus.DONE, PrefillStatus.ABORTED)
    else:
        assert outcome.status in (PrefillStatus.ABORTED, PrefillStatus.FAILED)
    assert collector.wait_final(tid).final.finish is FinishReason.ABORT
    if state == "queued":
        prefill.abort("blocker")
        decode.worker.abort("blocker")
        collector.wait_outcome("blocker")
        collector.wait_final("blocker")
