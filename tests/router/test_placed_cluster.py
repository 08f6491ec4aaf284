"""A router with this machine's cost profile (bench/results/costmodel/profile_cpu.json)
over real workers (1 prefill + 1 decode, SmolLM2): every request is placed by predicted
cost, its output equals the single-process engine's, its final message carries the
prediction, and a burst past the SLO is refused at once with the prediction in the
message; no block is left held."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from rpc_helpers import collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import SamplingParams
from pdserve.protocol import CostProfile
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
PROFILE = Path(__file__).resolve().parents[2] / "bench/results/costmodel/profile_cpu.json"
SHORT = "The capital of France is"
LONG = "Tell me about the history of the river and the town that grew around it. " * 40


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=1, num_blocks=1024, heartbeat_s=0.2,
                       router=RouterConfig(refresh_s=0.2,
                                           cost_profile=CostProfile.load(PROFILE)))
    c = LocalCluster(spec)
    yield c
    c.close()


def test_placed_requests_equal_the_engine_and_carry_the_prediction(cluster, smollm2_llm):
    stub = stub_for(cluster.address)
    predicted: list[float] = []
    for prompt in (SHORT, LONG):
        want = smollm2_llm.generate([prompt], SamplingParams(max_tokens=8,
                                                             temperature=0.0))[0]
        _, ids, final = collect(stub, greedy_request(prompt, max_tokens=8), timeout=120)
        assert ids == list(want.token_ids)
        assert final.timing.predicted_ttft_ms > 0
        assert final.timing.first_token_ms > 0
        predicted.append(final.timing.predicted_ttft_ms)
    # the hint still binds: `always` takes the prefill worker whatever the prediction
    _, ids, final = collect(stub, greedy_request(SHORT, max_tokens=8,
                                                 disaggregation=pb.DISAGGREGATION_ALWAYS))
    assert final.disaggregated and final.prefill_worker
    assert predicted[1] > predicted[0]  # a longer prompt is predicted to take longer
    wait_cluster_idle(cluster)


def test_a_burst_past_the_slo_is_refused_at_once_with_the_prediction(cluster):
    stub = stub_for(cluster.address)
    # about two of these prompts' prefills fit in the SLO on this machine's profile
    profile = CostProfile.load(PROFILE)
    one = profile.step.step_s(700, 700 * 701 // 2)
    slo_ms = 2.5 * one * 1000

    def send(i):
        req = greedy_request(f"{i} " + LONG, max_tokens=4, slo=pb.Slo(ttft_ms=slo_ms))
        started = time.monotonic()
        try:
            collect(stub, req, timeout=300)
            return "ok", "", time.monotonic() - started
        except grpc.RpcError as e:
            return e.code(), e.details(), time.monotonic() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(12)))
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [r for r in results if r[0] == "ok"]
    assert len(served) + len(refused) == len(results), results  # none failed
    assert served and refused, results
    assert all("predicted time to first token" in why for _, why, _ in refused)
    assert max(t for *_, t in refused) < 5.0
    wait_cluster_idle(cluster)
    router = cluster.routers[0].router
    # every remote request's KV was taken off the books once its first token came
    assert len(router.door.incoming) == 0 and router.ledger.tokens("prefill-0") == 0


def test_a_remote_request_cancelled_before_its_first_token_leaves_nothing_booked(cluster):
    """The client goes away while its prompt is prefilled and its KV on its way: the KV is
    taken off the decode worker's incoming book (router.incoming), the prompt off the
    prefill worker's ledger, and every block is freed on both workers."""
    stub = stub_for(cluster.address)
    router = cluster.routers[0].router
    req = greedy_request(LONG * 2, max_tokens=4, slo=pb.Slo(ttft_ms=600_000),
                         disaggregation=pb.DISAGGREGATION_ALWAYS)
    call = stub.Generate(req, timeout=300)
    end = time.monotonic() + 60
    while not len(router.door.incoming) and time.monotonic() < end:
        time.sleep(0.005)
    assert len(router.door.incoming) == 1  # dispatched: the KV is on its way
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_cluster_idle(cluster)
    end = time.monotonic() + 5
    while (len(router.door.incoming) or router.ledger.tokens("prefill-0")) \
            and time.monotonic() < end:
        time.sleep(0.01)
    assert len(router.door.incoming) == 0 and router.ledger.tokens("prefill-0") == 0


def test_the_ttft_scale_learns_at_the_first_token_not_at_the_requests_end(cluster):
    """A TTFT is known at the first token: the worker's scale moves then, while the request
    still decodes, not a whole decode later (a chat workload admits ten or twenty more
    requests in between, on the stale scale)."""
    stub = stub_for(cluster.address)
    calibration = cluster.routers[0].router.calibration
    before = calibration.local_ttft.scale("decode-0")
    call = stub.Generate(greedy_request(SHORT + " once more", max_tokens=200,
                                        disaggregation=pb.DISAGGREGATION_NEVER), timeout=300)
    first = next(call)
    assert first.HasField("chunk")
    end = time.monotonic() + 5  # the router stamps the token before it is streamed
    while calibration.local_ttft.scale("decode-0") == before and time.monotonic() < end:
        time.sleep(0.005)
    assert calibration.local_ttft.scale("decode-0") != before
    assert cluster.routers[0].router.view.workers["decode-0"].in_flight  # still decoding
    call.cancel()
    wait_cluster_idle(cluster)
