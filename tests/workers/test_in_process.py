"""Workers as plain objects in this process (as Ray will host them): the torch transport,
a refused handshake, and closing workers with live jobs."""

from __future__ import annotations

import pytest
from helpers import greedy
from pdserve.decode_worker import DecodeJob, DecodeState, DecodeWorker, StreamFinish
from pdserve.deploy.driver import run_disaggregated
from pdserve.deploy.local import Role
from pdserve.engine import LLM
from pdserve.kvtransfer.transports import TransportKind
from pdserve.prefill_worker import PrefillJob, PrefillState, PrefillWorker
from worker_driver import wait_idle, wait_state
from worker_procs import worker_config

PROMPTS = [[3, 1, 4, 1, 5], list(range(10, 90)), [7] * 33]


def with_transport(config, transport: TransportKind):
    return type(config)(**{**config.__dict__, "transport": transport})


@pytest.mark.parametrize("transport", [TransportKind.ZMQ, TransportKind.TORCH])
def test_1p1d_in_process_equals_llm(tiny_llama_dir, collector, transport):
    p = PrefillWorker(with_transport(worker_config(Role.PREFILL, tiny_llama_dir, "p"),
                                     transport))
    d = DecodeWorker(with_transport(worker_config(Role.DECODE, tiny_llama_dir, "d"),
                                    transport))
    try:
        expected = LLM(str(tiny_llama_dir), block_size=4).generate(PROMPTS, greedy(8))
        for i, prompt in enumerate(PROMPTS):
            out = run_disaggregated(collector, p, d, f"{transport.value}-{i}", prompt,
                                    greedy(8))
            assert out.token_ids == expected[i].token_ids
        wait_idle(p)
        wait_idle(d)
    finally:
        p.close()
        d.close()


def test_a_refused_handshake_fails_the_prefill_job_and_names_the_field(
        tiny_llama_dir, tiny_qwen2_dir, collector):
    p = PrefillWorker(worker_config(Role.PREFILL, tiny_llama_dir, "p"))
    d = DecodeWorker(worker_config(Role.DECODE, tiny_qwen2_dir, "d"))
    try:
        endpoint = d.reserve(DecodeJob("mismatch", PROMPTS[0], greedy(4), collector.endpoint))
        result = p.prefill(PrefillJob("mismatch", PROMPTS[0], greedy(4), endpoint), timeout=10)
        assert result.state is PrefillState.FAILED
        assert "handshake refused: model_id differs" in result.reason
        wait_idle(p)
        d.abort("mismatch")  # the router gives up on the decode side too
        assert collector.wait("mismatch").final.finish is StreamFinish.ABORT
        wait_idle(d)
    finally:
        p.close()
        d.close()


def test_closing_workers_ends_their_live_jobs(tiny_llama_dir, collector):
    p = PrefillWorker(worker_config(Role.PREFILL, tiny_llama_dir, "p",
                                    max_num_batched_tokens=1))
    d = DecodeWorker(worker_config(Role.DECODE, tiny_llama_dir, "d"))
    prompt = [i % 250 for i in range(400)]
    endpoint = d.reserve(DecodeJob("live", prompt, greedy(4), collector.endpoint))
    result = p.submit(PrefillJob("live", prompt, greedy(4), endpoint))
    wait_state(p, "live", PrefillState.PREFILLING)
    wait_state(d, "live", DecodeState.RECEIVING)
    p.close()
    assert result.result(5).state is PrefillState.FAILED
    assert result.result().reason == "prefill worker closed"
    final = collector.wait("live").final  # the prefill worker told the decode worker
    assert final.finish is StreamFinish.ERROR and "prefill worker closed" in final.error
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(PrefillJob("late", prompt, greedy(4), endpoint)).result(5)

    d.reserve(DecodeJob("waiting", prompt, greedy(4), collector.endpoint))
    d.close()
    final = collector.wait("waiting").final
    assert final.finish is StreamFinish.ERROR and final.error == "decode worker closed"
    assert p.load().is_idle and d.load().is_idle
