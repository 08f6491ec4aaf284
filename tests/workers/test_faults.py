"""Kills and aborts across worker processes: every job ends in bounded time and every
worker, prefill and decode, is left with all blocks free and no job.

The prefill worker here runs two tokens per step and one sequence at a time, so a 400-token
prompt takes a couple of hundred steps: long enough to act while it is in a given state."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import greedy
from pdserve.decode_worker import DecodeJob, DecodeState, StreamFinish
from pdserve.deploy.driver import run_disaggregated
from pdserve.deploy.local import Role
from pdserve.engine import LLM
from pdserve.prefill_worker import PrefillJob, PrefillState
from worker_driver import wait_idle, wait_state
from worker_procs import spawn, stop_all, worker_config

LONG = tuple((i * 37) % 251 for i in range(400))
SHORT = (5, 6, 7, 8, 9)


def slow_prefill_config(model_dir, worker_id):
    return worker_config(Role.PREFILL, model_dir, worker_id, max_num_batched_tokens=2,
                         max_num_seqs=1, ack_timeout_s=5.0)


@pytest.fixture(scope="module")
def procs(tiny_llama_dir):
    procs = spawn([(Role.PREFILL, slow_prefill_config(tiny_llama_dir, "p-slow")),
                   (Role.DECODE, worker_config(Role.DECODE, tiny_llama_dir, "d-main"))])
    yield procs
    stop_all(procs)


@pytest.fixture(scope="module")
def prefill(procs):
    return procs[0].worker


@pytest.fixture(scope="module")
def decode(procs):
    return procs[1].worker


@pytest.fixture(scope="module")
def short_expected(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), block_size=4).generate([list(SHORT)], greedy(6))[0].token_ids


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(4) as pool:
        yield pool


@pytest.fixture(autouse=True)
def no_leaks(prefill, decode):
    yield
    wait_idle(prefill)
    wait_idle(decode)


def start(pool, collector, prefill, decode, tid, prompt=LONG, params=None, lease_s=30.0):
    """Reserve on `decode` and submit to `prefill` without waiting; the prefill Future."""
    params = params or greedy(4)
    endpoint = decode.reserve(DecodeJob(tid, prompt, params, collector.endpoint, lease_s))
    return pool.submit(prefill.prefill, PrefillJob(tid, prompt, params, endpoint))


def test_decode_worker_killed_mid_transfer(tiny_llama_dir, pool, collector, prefill, decode,
                                           short_expected):
    (victim,) = spawn([(Role.DECODE, worker_config(Role.DECODE, tiny_llama_dir, "d-victim"))])
    try:
        result = start(pool, collector, prefill, victim.worker, "kill-d")
        wait_state(victim.worker, "kill-d", DecodeState.RECEIVING)
        killed = time.monotonic()
        victim.kill()
        outcome = result.result(timeout=30)
        assert outcome.state is PrefillState.FAILED
        assert "disconnected" in outcome.reason or "acknowledgement" in outcome.reason
        assert time.monotonic() - killed < 10  # the dropped connection, or the ack timeout
    finally:
        victim.kill()
    wait_idle(prefill)
    # the prefill worker carries on with other decode workers
    out = run_disaggregated(collector, prefill, decode, "after-kill-d", SHORT, greedy(6))
    assert out.token_ids == short_expected


def test_prefill_worker_killed_mid_transfer(tiny_llama_dir, pool, collector, decode):
    (victim,) = spawn([(Role.PREFILL, slow_prefill_config(tiny_llama_dir, "p-victim"))])
    try:
        result = start(pool, collector, victim.worker, decode, "kill-p", lease_s=4.0)
        wait_state(decode, "kill-p", DecodeState.RECEIVING)
        victim.kill()
        with pytest.raises((EOFError, ConnectionError)):
            result.result(timeout=30)
    finally:
        victim.kill()
    final = collector.wait("kill-p", timeout=15).final  # the lease expires
    assert final.finish is StreamFinish.ERROR
    assert "deadline" in final.error


def test_a_lease_with_no_prefill_expires(collector, decode):
    decode.reserve(DecodeJob("orphan", LONG, greedy(4), collector.endpoint, lease_s=0.3))
    final = collector.wait("orphan", timeout=10).final
    assert final.finish is StreamFinish.ERROR and final.stamps.kv_received == 0.0


def _abort_both(prefill, decode, tid):
    prefill.abort(tid)  # the router aborts P first, so no more KV is sent for it
    decode.abort(tid)


@pytest.mark.parametrize("state", ["queued", "prefilling", "transferring", "decoding"])
def test_abort_in_each_state_frees_both_sides(state, pool, collector, prefill, decode):
    tid = f"abort-{state}"
    blocker = None
    if state == "queued":  # one sequence at a time: a long job ahead keeps it queued
        blocker = start(pool, collector, prefill, decode, "blocker")
        wait_state(prefill, "blocker", PrefillState.PREFILLING)
    params = greedy(400, ignore_eos=True) if state == "decoding" else greedy(4)
    prompt = SHORT if state == "decoding" else LONG
    result = start(pool, collector, prefill, decode, tid, prompt, params)
    if state == "queued":
        wait_state(prefill, tid, PrefillState.QUEUED)
    elif state == "prefilling":
        wait_state(prefill, tid, PrefillState.PREFILLING)
    elif state == "transferring":
        wait_state(decode, tid, DecodeState.RECEIVING)
    else:
        wait_state(decode, tid, DecodeState.DECODING)
    _abort_both(prefill, decode, tid)
    outcome = result.result(timeout=30)
    if state == "decoding":
        # the prefill had ended; its worker may not have read the ack before the abort came
        assert outcome.state in (PrefillState.DONE, PrefillState.ABORTED)
    else:
        assert outcome.state in (PrefillState.ABORTED, PrefillState.FAILED)
    final = collector.wait(tid).final
    assert final.finish is StreamFinish.ABORT
    if blocker is not None:
        _abort_both(prefill, decode, "blocker")
        blocker.result(timeout=30)
        collector.wait("blocker")
