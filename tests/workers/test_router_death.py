"""A router dies while workers hold its jobs: the workers notice its token stream is gone
(worker.publisher) and end every job it ordered, in any state, within the grace period
plus a margin, freeing every block; the jobs of a live router go on and finish normally.
A router that is back within the grace period loses nothing.

The dying router is a real process: a ZMQ PULL socket bound where the router's stream
would be (router.stream), draining what arrives, killed with SIGKILL. The live router is
the tests' stream collector. The prefill worker runs one token per step and one sequence
at a time, so a long prompt keeps jobs queued behind it; the model allows long outputs, so
a decode job is still decoding when the router dies."""

from __future__ import annotations

import time

import pytest
import torch
from driver import reserve, submit
from helpers import greedy, wait_for
from stream_sink import RouterProcess
from worker_driver import wait_idle, wait_state
from worker_procs import spawn, stop_all, worker_config

from pdserve.decode_worker import DecodeState
from pdserve.engine import LLM
from pdserve.prefill_worker import PrefillState
from pdserve.protocol import FinishReason, PrefillStatus, WorkerRole

GRACE_S = 3.0
# a generous margin for a loaded 2-core machine: the bound asserted is GRACE_S + MARGIN_S
MARGIN_S = 20.0
SHORT = (5, 6, 7, 8, 9)
LONG = tuple((i * 37) % 251 for i in range(400))
MEDIUM = tuple((i * 53 + 7) % 251 for i in range(40))

@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory):
    """A tiny random Llama that allows 8k positions: long outputs, fast steps."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("tiny-long")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def procs(long_tiny_dir):
    common = dict(num_blocks=4096, router_stream_grace_s=GRACE_S)
    procs = spawn([worker_config(WorkerRole.PREFILL, long_tiny_dir, "p-slow",
                                 max_num_batched_tokens=1, max_num_seqs=1, **common),
                   worker_config(WorkerRole.DECODE, long_tiny_dir, "d-main", **common)])
    yield procs
    stop_all(procs)


@pytest.fixture(autouse=True)
def no_leaks(prefill, decode):
    yield
    wait_idle(prefill, timeout=60)
    wait_idle(decode, timeout=60)


def start(router_endpoint: str, prefill, decode, tid: str, prompt, params) -> None:
    """Reserve and submit as the router at `router_endpoint` would."""
    stream = _Endpoint(router_endpoint)
    submit(stream, prefill, tid, prompt, params, reserve(stream, decode, tid, prompt, params))


class _Endpoint:
    """What driver.reserve/submit read of a collector: its endpoint."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint


def test_a_dead_routers_jobs_end_in_every_state_and_a_live_routers_finish(
        long_tiny_dir, collector, prefill, decode):
    dying = RouterProcess()
    try:
        # the live router's long decode, streaming through the death and the grace period
        start(collector.endpoint, prefill, decode, "a-decoding", SHORT,
              greedy(5000, ignore_eos=True))
        wait_state(decode, "a-decoding", DecodeState.DECODING)
        # the dying router's jobs: one decoding, one prefilling, one queued behind it
        start(dying.endpoint, prefill, decode, "b-decoding", SHORT,
              greedy(6000, ignore_eos=True))
        wait_state(decode, "b-decoding", DecodeState.DECODING)
        start(dying.endpoint, prefill, decode, "b-prefilling", LONG, greedy(4))
        wait_state(prefill, "b-prefilling", PrefillState.PREFILLING)
        start(dying.endpoint, prefill, decode, "b-queued", LONG[::-1], greedy(4))
        # the live router's prefill job, queued behind the dying router's
        start(collector.endpoint, prefill, decode, "a-queued", MEDIUM, greedy(8))
        for tid in ("b-queued", "a-queued"):
            wait_state(prefill, tid, PrefillState.QUEUED)
        b_jobs = {"b-decoding": [decode], "b-prefilling": [prefill, decode],
                  "b-queued": [prefill, decode]}
        assert all(w.job_state(t) is not None for t, ws in b_jobs.items() for w in ws)
        killed = time.monotonic()
    finally:
        dying.kill()

    wait_for(lambda: all(w.job_state(t) is None for t, ws in b_jobs.items() for w in ws),
             GRACE_S + MARGIN_S, "the dead router's jobs to end")
    elapsed = time.monotonic() - killed
    assert elapsed >= GRACE_S * 0.9, elapsed  # not before the grace period
    assert decode.job_state("a-decoding") is DecodeState.DECODING  # untouched

    want = LLM(str(long_tiny_dir), block_size=4).generate([list(MEDIUM)], greedy(8))[0]
    queued = collector.wait_final("a-queued", timeout=120)
    assert queued.final.finish is FinishReason.LENGTH and queued.token_ids == want.token_ids
    assert collector.wait_outcome("a-queued").status is PrefillStatus.DONE
    decoding = collector.wait_final("a-decoding", timeout=300)
    assert decoding.final.finish is FinishReason.LENGTH and len(decoding.token_ids) == 5000
    assert not {"b-decoding", "b-prefilling", "b-queued"} & collector.streams.keys()


def test_a_router_back_within_the_grace_period_loses_nothing(collector, prefill, decode):
    router, spare = RouterProcess(), RouterProcess(bind=None)
    try:
        # as long as the model's positions allow: still decoding at 1.5 grace periods
        start(router.endpoint, prefill, decode, "c-decoding", SHORT,
              greedy(8100, ignore_eos=True))
        wait_state(decode, "c-decoding", DecodeState.DECODING)
        router.kill()
        spare.bind_at(router.endpoint)  # the same port again, well within the grace period
        back = time.monotonic()
        # the worker reconnects: the job outlives the grace period counted from the death
        wait_for(lambda: time.monotonic() - back > GRACE_S * 1.5
                 or decode.job_state("c-decoding") is None, 60, "1.5 grace periods")
        assert decode.job_state("c-decoding") is DecodeState.DECODING
    finally:
        decode.abort("c-decoding")
        prefill.abort("c-decoding")
        router.kill()
        spare.kill()
