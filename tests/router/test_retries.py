"""A worker that dies before the first token does not fail the request: the router
dispatches it again (re-sending the KV the prefill worker holds when the decode worker
died, prefilling anew when the prefill worker did) and the client gets the output an
undisturbed run gives, with the retry counted in the final message. Real processes,
SmolLM2, 1 prefill + 2 decode workers."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from rpc_helpers import collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import SamplingParams
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
PROMPT = "Tell me about the history of the river and the town that grew around it. " * 60


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=2, num_blocks=512, heartbeat_s=0.2,
                       heartbeat_ttl_s=1.5, router=RouterConfig(refresh_s=0.2))
    c = LocalCluster(spec)
    yield c
    c.close()


@pytest.fixture(scope="module")
def want(smollm2_llm):
    return smollm2_llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]


def in_background(stub, req):
    """Send `req` from a thread: (outcome dict, thread)."""
    outcome: dict = {}

    def run():
        try:
            outcome["text"], outcome["ids"], outcome["final"] = collect(stub, req, 120)
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            outcome["code"], outcome["details"] = e.code(), e.details()

    thread = threading.Thread(target=run)
    thread.start()
    return outcome, thread


def busy_worker(stub, role: str, timeout: float = 60.0) -> str:
    """The worker of `role` that holds a request, from the router's status."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        busy = [w.worker_id for w in status.workers if w.role == role and w.in_flight]
        if busy:
            return busy[0]
        time.sleep(0.01)
    raise AssertionError(f"no {role} worker took the request")


def test_a_decode_worker_dead_mid_transfer_gets_the_kv_resent_without_recompute(
        cluster, want):
    """Killed while the prefill streams its KV: the prefill job keeps the KV, and the second
    dispatch reserves on the other decode worker and re-sends it there; the prompt is
    computed once (the prefill began before the second dispatch)."""
    stub = stub_for(cluster.address)
    outcome, thread = in_background(stub, greedy_request(
        PROMPT, 8, disaggregation=pb.DISAGGREGATION_ALWAYS))
    victim = busy_worker(stub, "decode")
    busy_worker(stub, "prefill")  # reserved, and the prefill computes and sends
    cluster.kill_worker(victim)
    thread.join(120)
    assert outcome["code"] == grpc.StatusCode.OK, outcome
    assert (outcome["ids"], outcome["text"]) == (want.token_ids, want.text)
    final = outcome["final"]
    assert final.attempts == 2 and final.migrations == 0 and final.timing.retry_ms > 0
    assert final.decode_worker != victim and final.prefill_worker == "prefill-0"
    assert final.kv_resends == 1
    assert final.timing.prefill_start < final.timing.dispatched  # not computed again
    wait_cluster_idle(cluster)


def test_a_prefill_worker_dead_mid_prefill_leaves_the_prompt_to_the_decode_worker(
        cluster, want):
    """The only prefill worker dies while it computes: the request is prefilled again where
    it can be, on the decode worker, rather than waiting for a prefill worker."""
    stub = stub_for(cluster.address)
    outcome, thread = in_background(stub, greedy_request(
        PROMPT, 8, disaggregation=pb.DISAGGREGATION_ALWAYS))
    busy_worker(stub, "prefill")
    cluster.kill_worker("prefill-0")
    thread.join(120)
    assert outcome["code"] == grpc.StatusCode.OK, outcome
    assert (outcome["ids"], outcome["text"]) == (want.token_ids, want.text)
    final = outcome["final"]
    assert final.attempts == 2 and final.prefill_worker == "" and not final.disaggregated
    wait_cluster_idle(cluster)
