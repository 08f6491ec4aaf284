"""A worker is warm before anyone can route to it: its constructor ran a warm-up pass through
every engine path its role serves, and the pass left nothing behind (every block free, the
prefix cache empty, nothing for the cluster's prefix index, the load counters and the shared
sampling generator as on a fresh engine)."""

from __future__ import annotations

import pytest
from helpers import greedy, run_to_completion, wait_for
from worker_procs import worker_config

from pdserve.decode_worker import ColocatedWorker, DecodeWorker
from pdserve.deploy.heartbeat import Heartbeat, HeartbeatConfig
from pdserve.deploy.redis_server import RedisServer
from pdserve.engine import Engine, SamplingParams
from pdserve.prefill_worker import PrefillWorker
from pdserve.protocol import WorkerRole
from pdserve.router.registry import PREFIX, sync_client

WORKERS = {WorkerRole.PREFILL: PrefillWorker, WorkerRole.DECODE: DecodeWorker,
           WorkerRole.COLOCATED: ColocatedWorker}


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.mark.parametrize("role", list(WorkerRole))
def test_a_new_worker_ran_its_warm_up_and_holds_nothing(tiny_llama_dir, redis_url, role):
    config = worker_config(role, tiny_llama_dir, f"warm-{role.value}")
    worker = WORKERS[role](config)
    try:
        warm = worker.warmup
        assert warm.prompt_tokens == 64 and warm.prefill_steps >= 1
        # a prefill-only engine stops at the first token; the others decoded after it
        assert (warm.decode_steps > 0) is (role is not WorkerRole.PREFILL)
        load = worker.load()
        assert load.is_idle and load.num_jobs == 0
        e = load.engine
        assert (e.num_prefix_query_tokens, e.num_prefix_hit_tokens, e.num_preemptions) == (0, 0, 0)
        # registered as `pdserve serve` registers it: no warm-up block reaches the index.
        # The first beat starts the loop's record of prefix events; the next beat, after two
        # loop turns (the first may have gathered before the record began), has the engine's
        # first drain: every block its prefix cache held.
        beat = Heartbeat(HeartbeatConfig(redis_url, "node", config.engine.cache.block_size),
                         worker, config.worker_id, role)
        try:
            for _ in range(2):
                turn = worker.load().time
                wait_for(lambda t=turn: worker.load().time > t, 5, "a loop turn")
            beat.beat()
            assert beat.cached == set()
            client = sync_client(redis_url)
            assert list(client.scan_iter(f"{PREFIX}prefix:*")) == []
            client.close()
        finally:
            beat.stop()
    finally:
        worker.close()


def test_the_warm_up_leaves_unseeded_sampling_as_on_a_fresh_engine(tiny_llama_dir):
    """The shared generator draws the same tokens with or without a warm-up before."""
    config = worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c").engine
    sampled = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    outputs = []
    for warm in (False, True):
        engine = Engine(config)
        if warm:
            engine.warm_up()
        engine.add_request("a", [5, 6, 7, 8, 9], sampled)
        engine.add_request("b", [3, 1, 4], greedy(6))
        outputs.append(run_to_completion(engine))
    assert outputs[0] == outputs[1]


def test_the_warm_up_needs_a_fresh_engine(tiny_llama_dir):
    engine = Engine(worker_config(WorkerRole.COLOCATED, tiny_llama_dir, "c").engine)
    engine.add_request("a", [1, 2, 3], greedy(2))
    with pytest.raises(RuntimeError, match="fresh engine"):
        engine.warm_up()
