"""Adaptive workers switching roles at run time (worker.switch): mid-traffic on the real
model, every request equal to engine.LLM before and after, the same Engine object, no
block left behind; then the edges of a switch (idempotent requests, a new target during a
drain, calling it off, the drain timeout) on a tiny model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from driver import reserve, run_disaggregated, run_many
from helpers import assert_no_leaks, greedy, wait_for
from worker_driver import wait_idle, wait_state
from worker_procs import worker_config

from pdserve.decode_worker import DecodeState, DecodeWorker
from pdserve.deploy.adaptive_worker import AdaptiveWorker
from pdserve.engine import EngineMode
from pdserve.protocol import DecodeOrder, FinishReason, PrefillOrder, WorkerRole, WorkerState
from pdserve.worker.switch import NotServing

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue.", "Name three primes.",
             "What colour is grass?", "Say hello in French."]


def adaptive(model_dir, role: WorkerRole, worker_id: str, **kw) -> AdaptiveWorker:
    config = worker_config(role, model_dir, worker_id, block_size=16, num_blocks=128,
                           max_num_batched_tokens=512, **kw)
    return AdaptiveWorker(replace(config, adaptive=True))


def wait_role(worker, role: WorkerRole, timeout: float = 60.0) -> None:
    wait_for(lambda: (s := worker.role_status()).role is role
             and s.state is WorkerState.SERVING, timeout, f"{worker.worker_id} as {role.value}")


@pytest.mark.slow
def test_two_workers_swap_roles_mid_traffic(smollm2_dir, smollm2_llm, collector):
    tok = smollm2_llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    expected = [o.token_ids for o in smollm2_llm.generate(prompts, greedy(24))]
    a = adaptive(smollm2_dir, WorkerRole.PREFILL, "a")
    b = adaptive(smollm2_dir, WorkerRole.DECODE, "b")
    engines = (a.engine, b.engine)
    try:
        with ThreadPoolExecutor(3) as pool:
            first = [pool.submit(run_disaggregated, collector, a, b, f"swap-{i}", p,
                                 greedy(24)) for i, p in enumerate(prompts[:3])]
            wait_state(b, "swap-0", DecodeState.DECODING)
            assert a.switch_role(WorkerRole.DECODE) and b.switch_role(WorkerRole.PREFILL)
            # b holds decodes in flight: it drains, refusing new orders, until they end
            status = b.role_status()
            assert status.state is WorkerState.DRAINING and status.target is WorkerRole.PREFILL
            order = DecodeOrder("late", tuple(prompts[3]), greedy(4), collector.endpoint)
            with pytest.raises(NotServing):
                b.reserve(order)
            with pytest.raises(NotServing):
                a.submit(PrefillOrder("late", tuple(prompts[3]), greedy(4), "tcp://x:1",
                                      collector.endpoint))
            outs = [f.result() for f in first]
        assert [o.token_ids for o in outs] == expected[:3]
        assert all(o.finish in (FinishReason.LENGTH, FinishReason.STOP) for o in outs)
        wait_role(a, WorkerRole.DECODE)
        wait_role(b, WorkerRole.PREFILL)
        # the same engines (no model load), now in the other modes, nothing held
        assert (a.engine, b.engine) == engines
        assert a.engine.mode is EngineMode.DECODE_ONLY
        assert b.engine.mode is EngineMode.PREFILL_ONLY
        assert a.kv_endpoint() and not b.kv_endpoint()
        assert a.role_status().switches == b.role_status().switches == 1
        # the next requests are served in the new roles: b prefills, a decodes
        outs = run_many(collector, [b], [a], prompts[3:], greedy(24), "swapped")
        assert [o.token_ids for o in outs] == expected[3:]
        for w in (a, b):
            wait_idle(w)
            assert_no_leaks(w.engine)
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def worker(tiny_llama_dir):
    w = adaptive(tiny_llama_dir, WorkerRole.DECODE, "t", drain_timeout_s=600)
    yield w
    w.close()


def test_asking_for_the_role_it_has_changes_nothing(worker):
    role = worker.role_status().role
    assert not worker.switch_role(role)
    assert worker.role_status().state is WorkerState.SERVING


def test_a_request_during_a_drain_replaces_the_target_and_one_back_calls_it_off(
        worker, collector):
    wait_role(worker, WorkerRole.DECODE)
    reserve(collector, worker, "held", [1, 2, 3, 4, 5], greedy(4), lease_s=600)
    wait_state(worker, "held", DecodeState.RESERVED)
    assert worker.switch_role(WorkerRole.PREFILL)
    assert not worker.switch_role(WorkerRole.PREFILL)  # twice: the same drain
    assert worker.role_status().target is WorkerRole.PREFILL
    assert worker.switch_role(WorkerRole.COLOCATED)  # a new target, the same drain
    status = worker.role_status()
    assert status.state is WorkerState.DRAINING and status.target is WorkerRole.COLOCATED
    assert worker.switch_role(WorkerRole.DECODE)  # back to its role: the drain is off
    assert worker.role_status().state is WorkerState.SERVING
    assert worker.job_state("held") is DecodeState.RESERVED  # nothing was ended
    worker.abort("held")
    assert collector.wait_final("held").final.finish is FinishReason.ABORT
    wait_idle(worker)
    assert worker.role_status().role is WorkerRole.DECODE


def test_the_switch_waits_for_the_jobs_then_happens_with_every_block_free(worker, collector):
    wait_role(worker, WorkerRole.DECODE)
    reserve(collector, worker, "pending", [9, 8, 7, 6], greedy(4), lease_s=600)
    worker.switch_role(WorkerRole.COLOCATED)
    assert worker.role_status().state is WorkerState.DRAINING
    worker.abort("pending")  # the last job ends: the switch follows
    wait_role(worker, WorkerRole.COLOCATED)
    assert_no_leaks(worker.engine)
    # a colocated worker serves whole requests
    worker.generate(DecodeOrder("whole", (5, 6, 7), greedy(3), collector.endpoint))
    assert len(collector.wait_final("whole").token_ids) == 3
    wait_idle(worker)


def test_jobs_still_live_after_the_drain_timeout_are_ended(tiny_llama_dir, collector):
    w = adaptive(tiny_llama_dir, WorkerRole.DECODE, "short", drain_timeout_s=0.2)
    try:
        reserve(collector, w, "stuck", [1, 2, 3], greedy(4), lease_s=600)
        w.switch_role(WorkerRole.PREFILL)
        final = collector.wait_final("stuck").final
        assert final.finish is FinishReason.ABORT and "changes role" in final.error
        wait_role(w, WorkerRole.PREFILL)
        assert_no_leaks(w.engine)
    finally:
        w.close()


def test_a_fixed_role_worker_does_not_switch(tiny_llama_dir):
    d = DecodeWorker(worker_config(WorkerRole.DECODE, tiny_llama_dir, "fixed"))
    try:
        assert not d.switch_role(WorkerRole.DECODE)
        with pytest.raises(ValueError, match="not adaptive"):
            d.switch_role(WorkerRole.PREFILL)
        assert d.role_status().role is WorkerRole.DECODE
    finally:
        d.close()
