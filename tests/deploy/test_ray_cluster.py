"""pdserve on a real multi-node Ray cluster (three nodes on this machine, through
`ray.cluster_utils.Cluster`): actors land on the nodes their pools name, requests through
the router equal engine.LLM, and a killed decode actor fails its request, the survivor
serves, and the restarted actor rejoins."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import ray
from ray.cluster_utils import Cluster
from rpc_helpers import LongRequest, collect, greedy_request, stub_for

from pdserve.deploy.ray_cluster import Placement, RayCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import SamplingParams
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
ALWAYS = pb.DISAGGREGATION_ALWAYS


@pytest.fixture(scope="module")
def ray_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"router": 1}, "include_dashboard": False})
    prefill = cluster.add_node(num_cpus=2, resources={"prefill": 1})
    decode = cluster.add_node(num_cpus=2, resources={"decode": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="pdserve", include_dashboard=False,
             log_to_driver=False)
    yield {"head": cluster.head_node.node_id, "prefill": prefill.node_id,
           "decode": decode.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def pd(ray_nodes):
    spec = ClusterSpec(prefill=1, decode=2, num_blocks=256, heartbeat_s=0.2,
                       heartbeat_ttl_s=1.5, router=RouterConfig(refresh_s=0.2))
    c = RayCluster(spec, Placement(prefill_resource="prefill", decode_resource="decode"),
                   max_restarts=2)
    yield c
    c.close()


def test_actors_land_on_the_nodes_their_pool_names(pd, ray_nodes):
    assert pd.nodes == {"prefill-0": ray_nodes["prefill"], "decode-0": ray_nodes["decode"],
                        "decode-1": ray_nodes["decode"]}


def test_requests_through_the_router_equal_llm(pd, smollm2_llm):
    prompts = ["The capital of France is", "Three primary colors are"]
    expected = smollm2_llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    stub = stub_for(pd.address)
    for prompt, want in zip(prompts, expected, strict=True):
        text, ids, final = collect(stub, greedy_request(prompt, 12, disaggregation=ALWAYS))
        assert (ids, text) == (want.token_ids, want.text)
        assert final.prefill_worker == "prefill-0"
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
    nodes = {w.worker_id: w.node for w in status.workers}
    assert nodes["prefill-0"] == pd.nodes["prefill-0"]  # the registry names Ray's nodes


def test_a_killed_decode_actor_migrates_its_request_and_rejoins_after_restart(
        pd, smollm2_llm):
    want = smollm2_llm.generate([LongRequest.PROMPT], SamplingParams(
        max_tokens=120, temperature=0.0, ignore_eos=True))[0]
    stub = stub_for(pd.address)
    long = LongRequest(stub, max_tokens=120)
    victim, outcome, thread = long.victim, long.outcome, long.thread
    os.kill(pd.pids[victim], signal.SIGKILL)  # the worker's process dies, as in a crash
    thread.join(90)
    assert outcome["code"] == grpc.StatusCode.OK, outcome
    assert outcome["ids"] == want.token_ids and outcome["final"].migrations == 1
    # the cluster serves on (Ray may have restarted the victim by now)
    assert collect(stub, greedy_request("Hello", 4, disaggregation=ALWAYS))[2] is not None
    # Ray restarts the actor; it registers a new incarnation and serves again
    actor = ray.get_actor(victim, namespace="pdserve")
    deadline = time.monotonic() + 120
    while True:
        try:
            node, pid = ray.get(actor.ready.remote(), timeout=120)
            break
        except ray.exceptions.ActorUnavailableError:  # restarting
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert pid != pd.pids[victim] and node == pd.nodes[victim]
    deadline = time.monotonic() + 30
    served = set()
    while victim not in served:
        assert time.monotonic() < deadline, f"{victim} never served again"
        # while both are idle the policy prefers decode-0: run two at once to reach both
        results: list = []

        def one(results=results):
            results.append(collect(stub, greedy_request("Hi", 24, disaggregation=ALWAYS))[2])

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served |= {f.decode_worker for f in results}
