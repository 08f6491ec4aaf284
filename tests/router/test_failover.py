"""Two routers on one Redis, and a decode worker that dies: its in-flight request migrates
to the survivor with its output unchanged, new requests go to the survivor, and both
routers drop the dead worker once its heartbeat entry expires."""

from __future__ import annotations

import time

import grpc
import pytest
from rpc_helpers import LongRequest, collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import SamplingParams
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
ALWAYS = pb.DISAGGREGATION_ALWAYS


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=2, num_blocks=256, heartbeat_s=0.2,
                       heartbeat_ttl_s=1.5, router=RouterConfig(refresh_s=0.2))
    c = LocalCluster(spec)
    c.add_router()
    yield c
    c.close()


def test_two_routers_on_one_redis_both_serve(cluster, smollm2_llm):
    want = smollm2_llm.generate(["Once upon a time"],
                                SamplingParams(max_tokens=12, temperature=0.0))[0]
    for router in cluster.routers:
        text, ids, final = collect(stub_for(router.address),
                                   greedy_request("Once upon a time", 12, disaggregation=ALWAYS))
        assert (text, ids) == (want.text, want.token_ids)
    wait_cluster_idle(cluster)


def test_a_request_on_a_dead_decode_worker_migrates_and_its_tokens_are_unchanged(
        cluster, smollm2_llm):
    """Killed mid-decode, the decode worker's request goes on from the survivor: prompt and
    tokens so far prefilled there anew, the stream uninterrupted, greedy output equal to a
    run no worker died in."""
    want = smollm2_llm.generate([LongRequest.PROMPT], SamplingParams(
        max_tokens=120, temperature=0.0, ignore_eos=True))[0]
    stub = stub_for(cluster.address)
    long = LongRequest(stub, max_tokens=120)
    victim, outcome, thread = long.victim, long.outcome, long.thread
    cluster.kill_worker(victim)
    thread.join(60)
    assert outcome["code"] == grpc.StatusCode.OK, outcome
    survivor = "decode-1" if victim == "decode-0" else "decode-0"
    final = outcome["final"]
    assert (outcome["ids"], outcome["text"]) == (want.token_ids, want.text)
    assert final.migrations == 1 and final.attempts == 2 and final.timing.retry_ms > 0
    assert final.decode_worker == survivor and final.usage.completion_tokens == 120
    assert final.usage.prompt_tokens == len(want.prompt_token_ids)  # the client's prompt
    _, _, final = collect(stub, greedy_request("Hello", 4, disaggregation=ALWAYS))
    assert final.decode_worker == survivor
    for router in cluster.routers:  # the dead worker's entry expires from both views
        deadline = time.monotonic() + 10
        while True:
            status = stub_for(router.address).GetClusterStatus(pb.GetClusterStatusRequest())
            if victim not in {w.worker_id for w in status.workers}:
                break
            assert time.monotonic() < deadline, f"{victim} still listed by {router.address}"
            time.sleep(0.1)
    wait_cluster_idle(cluster)  # the survivors hold nothing
