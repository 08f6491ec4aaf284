"""Above capacity through the real gRPC server (1 prefill + 1 decode worker, SmolLM2): a
burst of long prompts, far more prefill work than one decode lease lasts, ends with each
request either served in full or refused at admission at once; none fails after it was
admitted, and every block is free afterwards."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from rpc_helpers import collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import WorkerRole
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
LEASE_S = 1.0  # far shorter than the burst's queue: only keep-alives can hold reservations


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=1, num_blocks=1024, heartbeat_s=0.2,
                       heartbeat_ttl_s=3.0, keepalive_s=0.2,
                       router=RouterConfig(refresh_s=0.2, lease_s=LEASE_S))
    c = LocalCluster(spec)
    yield c
    c.close()


def long_request(seed: int, n: int = 500, **kw) -> pb.GenerateRequest:
    """`n` random token ids (no two requests share a prefix), disaggregated, 4 tokens out."""
    rng = random.Random(seed)
    req = greedy_request(max_tokens=4, disaggregation=pb.DISAGGREGATION_ALWAYS, **kw)
    req.token_ids.extend(rng.randrange(100, 40000) for _ in range(n))
    return req


def send(stub, req):
    started = time.monotonic()
    try:
        _, ids, final = collect(stub, req, timeout=300)
        return "ok", len(ids), final.finish_reason, time.monotonic() - started
    except grpc.RpcError as e:
        return e.code(), e.details(), None, time.monotonic() - started


def test_a_burst_beyond_the_lease_is_served_or_refused_at_once_never_failed(cluster):
    stub = stub_for(cluster.address)
    router = cluster.routers[0].router
    assert send(stub, long_request(0))[0] == "ok"  # the prefill worker measures its rate
    deadline = time.monotonic() + 30
    while not all(w.record.prefill_tokens_per_s > 0
                  for w in router.view.of_role(WorkerRole.PREFILL)):
        assert time.monotonic() < deadline, "no measured prefill rate reached the router"
        time.sleep(0.05)
    rate = min(w.record.prefill_tokens_per_s for w in router.view.of_role(WorkerRole.PREFILL))
    # an SLO that about four of these prompts' prefills fill: the rest of the burst is refused
    slo_ms = 4 * 500 / rate * 1000
    burst = [long_request(i + 1, slo=pb.Slo(ttft_ms=slo_ms)) for i in range(16)]
    with ThreadPoolExecutor(len(burst)) as pool:
        results = list(pool.map(lambda r: send(stub, r), burst))
    served = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(served) + len(refused) == len(burst), results  # nothing failed
    assert served and refused, results
    assert all(n == 4 for _, n, _, _ in served)
    assert all("refused at admission" in why for _, why, _, _ in refused)
    assert max(t for *_, t in refused) < 5.0  # refused at the door, not after waiting
    # the admitted ones waited longer than a lease in the prefill queue, and were served
    assert max(t for *_, t in served) > LEASE_S
    wait_cluster_idle(cluster)
