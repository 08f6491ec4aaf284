"""Faults in the middle of a partial transfer (the decode worker holds the prompt's leading
blocks in its prefix cache and the prefill worker sends only the rest), across worker
processes: an abort, a prefill worker that dies (the lease expires), a decode worker that
dies (the held KV is re-sent to another, which holds a different prefix). Each ends in
bounded time with every block free on every side: the shared prefix blocks lose the
job's reference but stay cached, so the next request still finds them.

The prefill worker runs one token per step (as in test_faults), so the uncached part of a
prompt streams for hundreds of steps: long enough to act while it does."""

from __future__ import annotations

import pytest
from driver import reserve, run_disaggregated, submit
from helpers import greedy
from worker_driver import wait_idle, wait_state
from worker_procs import slow_prefill_config, spawn, stop_all, worker_config

from pdserve.decode_worker import DecodeState
from pdserve.engine import LLM, ModelConfig
from pdserve.prefill_worker import PrefillState
from pdserve.protocol import (
    DecodeOrder,
    FinishReason,
    PrefillOrder,
    PrefillStatus,
    WorkerRole,
)

SHARED = tuple((i * 13 + 5) % 251 for i in range(120))  # 30 blocks of 4


def follow_up(seed: int, n: int = 300) -> tuple[int, ...]:
    """The shared context and `n` tokens of a new turn nothing else sends."""
    return SHARED + tuple((i * 37 + seed * 101) % 251 for i in range(n))


@pytest.fixture(scope="module")
def procs(tiny_llama_dir, collector):
    procs = spawn([slow_prefill_config(tiny_llama_dir, "p-slow"),
                   worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-main")])
    p, d = (proc.worker for proc in procs)
    # both prefix caches now hold SHARED's 30 blocks
    run_disaggregated(collector, p, d, "warm", SHARED, greedy(1))
    yield procs
    stop_all(procs)


@pytest.fixture(autouse=True)
def no_leaks(prefill, decode, collector, request):
    yield
    wait_idle(prefill)
    wait_idle(decode)
    # unreferenced but cached: a reservation still starts past them
    probe = f"probe-{request.node.name}"
    held = decode.reserve(DecodeOrder(probe, follow_up(0, 1), greedy(1), collector.endpoint))
    assert held.num_cached_tokens == 120
    decode.abort(probe)
    collector.wait_final(probe)
    wait_idle(decode)


def start(collector, prefill, decode, tid, prompt, lease_s=30.0):
    reservation = reserve(collector, decode, tid, prompt, greedy(4), lease_s)
    submit(collector, prefill, tid, prompt, greedy(4), reservation)
    return reservation


def test_an_abort_mid_partial_transfer_frees_both_sides(collector, prefill, decode):
    reservation = start(collector, prefill, decode, "delta-abort", follow_up(1))
    assert reservation.num_cached_tokens == 120
    wait_state(decode, "delta-abort", DecodeState.RECEIVING)
    wait_state(prefill, "delta-abort", PrefillState.PREFILLING)
    prefill.abort("delta-abort")
    decode.abort("delta-abort")
    assert collector.wait_outcome("delta-abort", timeout=30).status is PrefillStatus.ABORTED
    assert collector.wait_final("delta-abort").final.finish is FinishReason.ABORT


def test_a_prefill_worker_killed_mid_partial_transfer_ends_with_the_lease(
        tiny_llama_dir, collector, decode):
    (victim,) = spawn([slow_prefill_config(tiny_llama_dir, "p-victim")])
    try:
        reservation = start(collector, victim.worker, decode, "delta-kill-p", follow_up(2),
                            lease_s=2.0)
        assert reservation.num_cached_tokens == 120
        wait_state(decode, "delta-kill-p", DecodeState.RECEIVING)
        victim.kill()
    finally:
        stop_all([victim])  # dead on purpose: no longer a worker that died under a test
    final = collector.wait_final("delta-kill-p", timeout=15).final
    assert final.finish is FinishReason.ERROR and "lease expired" in final.error


def test_a_decode_worker_killed_mid_partial_transfer_the_kv_goes_to_another(
        tiny_llama_dir, collector, prefill, decode):
    """The victim holds only the first 64 tokens of the context, the main decode worker
    all 120: the re-send starts where the new reservation says, from the prefill's blocks
    for what was computed and as computed for the rest, and the output is undisturbed."""
    prompt = follow_up(3)
    want = LLM(str(tiny_llama_dir), block_size=4).generate([list(prompt)],
                                                          greedy(4))[0].token_ids
    (victim,) = spawn([worker_config(WorkerRole.DECODE, tiny_llama_dir, "d-victim")])
    try:
        run_disaggregated(collector, prefill, victim.worker, "victim-warm", SHARED[:65],
                          greedy(1))
        first = start(collector, prefill, victim.worker, "delta-kill-d", prompt)
        assert first.num_cached_tokens == 64
        wait_state(victim.worker, "delta-kill-d", DecodeState.RECEIVING)
        victim.kill()
        held = collector.wait_outcome("delta-kill-d", timeout=30)
        assert held.status is PrefillStatus.HELD
    finally:
        stop_all([victim])  # dead on purpose: no longer a worker that died under a test
    second = reserve(collector, decode, "delta-kill-d-2", prompt, greedy(4))
    assert second.num_cached_tokens == 120
    assert prefill.submit(PrefillOrder("delta-kill-d-2", prompt, greedy(4), second.kv_endpoint,
                                       collector.endpoint, resend_of="delta-kill-d",
                                       kv_start=second.num_cached_tokens))
    streamed = collector.wait_final("delta-kill-d-2", timeout=60)
    assert streamed.final.error == "" and streamed.token_ids == want
    assert streamed.final.kv_bytes == (len(prompt) - 120) * kv_per_token(tiny_llama_dir)
    assert collector.wait_outcome("delta-kill-d-2").status is PrefillStatus.DONE


def kv_per_token(model_dir) -> int:
    return ModelConfig.from_pretrained(model_dir).kv_bytes_per_token(4)
