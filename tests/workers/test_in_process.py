"""Workers as plain objects in this process (as Ray hosts them): every transport, a refused
handshake, closing workers with live jobs, and calls that never wait for a step."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from driver import reserve, run_disaggregated, submit
from helpers import greedy, wait_for
from worker_driver import wait_idle, wait_state
from worker_procs import worker_config

from pdserve.decode_worker import ColocatedWorker, DecodeState, DecodeWorker
from pdserve.engine import LLM
from pdserve.kvtransfer.transports import TransportKind
from pdserve.prefill_worker import PrefillState, PrefillWorker
from pdserve.protocol import DecodeOrder, FinishReason, PrefillStatus, WorkerRole

PROMPTS = [[3, 1, 4, 1, 5], list(range(10, 90)), [7] * 33]


def pair(model_dir, transport=TransportKind.ZMQ, **prefill_kw):
    p = PrefillWorker(replace(worker_config(WorkerRole.PREFILL, model_dir, "p", **prefill_kw),
                              transport=transport))
    d = DecodeWorker(replace(worker_config(WorkerRole.DECODE, model_dir, "d"),
                             transport=transport))
    return p, d


@pytest.mark.parametrize("transport", list(TransportKind))
def test_1p1d_in_process_equals_llm(tiny_llama_dir, collector, transport):
    p, d = pair(tiny_llama_dir, transport)
    try:
        expected = LLM(str(tiny_llama_dir), block_size=4).generate(PROMPTS, greedy(8))
        for i, prompt in enumerate(PROMPTS):
            out = run_disaggregated(collector, p, d, f"{transport.value}-{i}", prompt,
                                    greedy(8))
            assert out.token_ids == expected[i].token_ids
            assert out.prefill.status is PrefillStatus.DONE
        wait_idle(p)
        wait_idle(d)
    finally:
        p.close()
        d.close()


def test_a_worker_refuses_a_config_of_another_role(tiny_llama_dir):
    with pytest.raises(ValueError, match="needs a decode config"):
        DecodeWorker(worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c"))


def test_a_refused_handshake_fails_the_prefill_job_and_names_the_field(
        tiny_llama_dir, tiny_qwen2_dir, collector):
    p = PrefillWorker(worker_config(WorkerRole.PREFILL, tiny_llama_dir, "p"))
    d = DecodeWorker(worker_config(WorkerRole.DECODE, tiny_qwen2_dir, "d"))
    try:
        reservation = reserve(collector, d, "mismatch", PROMPTS[0], greedy(4))
        submit(collector, p, "mismatch", PROMPTS[0], greedy(4), reservation)
        outcome = collector.wait_outcome("mismatch", timeout=10)
        # the prefill had begun: its KV waits for a re-send to a decode worker that fits
        assert outcome.status in (PrefillStatus.HELD, PrefillStatus.FAILED)
        assert "handshake refused: model_id differs" in outcome.reason
        p.abort("mismatch")  # the router gives up on both sides
        wait_idle(p)
        d.abort("mismatch")
        assert collector.wait_final("mismatch").final.finish is FinishReason.ABORT
        wait_idle(d)
    finally:
        p.close()
        d.close()


def test_closing_workers_ends_their_live_jobs(tiny_llama_dir, collector):
    p, d = pair(tiny_llama_dir, max_num_batched_tokens=1)
    prompt = [i % 250 for i in range(400)]
    reservation = reserve(collector, d, "live", prompt, greedy(4))
    submit(collector, p, "live", prompt, greedy(4), reservation)
    wait_state(p, "live", PrefillState.PREFILLING)
    wait_state(d, "live", DecodeState.RECEIVING)
    p.close()
    outcome = collector.wait_outcome("live", timeout=5)
    assert outcome.status is PrefillStatus.FAILED and outcome.reason == "prefill worker closed"
    final = collector.wait_final("live").final  # the prefill worker told the decode worker
    assert final.finish is FinishReason.ERROR and "prefill worker closed" in final.error
    with pytest.raises(RuntimeError, match="closed"):
        submit(collector, p, "late", prompt, greedy(4), reservation)

    reserve(collector, d, "waiting", prompt, greedy(4))
    d.close()
    final = collector.wait_final("waiting").final
    assert final.finish is FinishReason.ERROR and final.error == "decode worker closed"
    with pytest.raises(RuntimeError, match="closed"):
        reserve(collector, d, "late", prompt, greedy(4))
    assert p.load().is_idle and d.load().is_idle


class _HeldStep:
    """Wraps a worker's model so that its next step blocks until `release()`: the test's
    way to be sure a call happens while a step is in progress."""

    def __init__(self, worker):
        self.running = threading.Event()
        self._go = threading.Event()
        runner = worker.engine.runner
        execute = runner.execute

        def held(*args, **kw):
            self.running.set()
            self._go.wait(60)
            return execute(*args, **kw)

        runner.execute = held

    def release(self) -> None:
        self._go.set()


def _in_thread(fn):
    """fn() in a thread; its result once it returned within 10 s, else AssertionError."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the call waited for the step in progress"
    return out.get("value")


def test_reserve_submit_and_generate_do_not_wait_for_the_step_in_progress(tiny_llama_dir,
                                                                          collector):
    p, d = pair(tiny_llama_dir)
    c = ColocatedWorker(worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c"))
    try:
        held = [_HeldStep(w) for w in (p, d, c)]
        # a local job on the decode and colocated workers, a prefill on the prefill worker:
        # each worker is now inside a step that cannot end
        d.generate(DecodeOrder("busy-d", PROMPTS[1], greedy(2), collector.endpoint))
        c.generate(DecodeOrder("busy-c", PROMPTS[1], greedy(2), collector.endpoint))
        reservation = reserve(collector, d, "busy-p", PROMPTS[1], greedy(2))
        submit(collector, p, "busy-p", PROMPTS[1], greedy(2), reservation)
        for h in held:
            assert h.running.wait(10)
        reservation = _in_thread(lambda: reserve(collector, d, "next", PROMPTS[0], greedy(3)))
        _in_thread(lambda: submit(collector, p, "next", PROMPTS[0], greedy(3), reservation))
        _in_thread(lambda: c.generate(DecodeOrder("next-c", PROMPTS[0], greedy(3),
                                                  collector.endpoint)))
        assert d.engine.stats().num_reserved == 2  # held while the step is still running
        for h in held:
            h.release()
        for tid in ("busy-d", "busy-c", "busy-p", "next", "next-c"):
            assert collector.wait_final(tid).final.finish is FinishReason.LENGTH
        for w in (p, d, c):
            wait_idle(w)
    finally:
        for w in (p, d, c):
            w.close()


def test_the_hand_off_needs_no_prefill_report(tiny_llama_dir, collector):
    """The decode worker's chunks carry the prefill's stamps and prefix hits, so the final
    one is complete however late the prefill worker's own report comes."""
    p, d = pair(tiny_llama_dir)
    try:
        run_disaggregated(collector, p, d, "warm", PROMPTS[1], greedy(2))
        out = run_disaggregated(collector, p, d, "again", PROMPTS[1], greedy(2))
        first, final = out.stream.first, out.stream.final
        assert final.num_cached_tokens == out.prefill.num_cached_tokens > 0
        assert first.num_cached_tokens == final.num_cached_tokens
        assert final.stamps.prefill_start == out.prefill.stamps.prefill_start > 0
        wait_for(lambda: p.load().is_idle and d.load().is_idle, 10, "idle workers")
    finally:
        p.close()
        d.close()
