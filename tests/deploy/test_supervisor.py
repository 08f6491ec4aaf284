"""The local cluster's supervisor with real worker processes (SmolLM2, 1 prefill + 1 decode,
at most one restart per worker): a worker whose engine loop broke and a worker killed by
SIGKILL are each replaced by a new incarnation that serves the same greedy output; health
follows (the whole service while the only decode worker is gone, the prefill pool's own
name while its only worker is); a worker that fails past its bound stays down.

The tests share one cluster and run in order: the last one leaves decode-0 down."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from breakable_workers import BREAK, build
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.deploy.supervisor import RestartPolicy
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
SERVICE = "pdserve.v1.PdServe"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RESTART_S = 180  # a new process loads the model; this machine is shared and slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=1, num_blocks=256, heartbeat_s=0.2,
                       heartbeat_ttl_s=1.5, router=RouterConfig(refresh_s=0.2))
    c = LocalCluster(spec, restarts=RestartPolicy(max_restarts=1, probe_s=0.2), build=build)
    yield c
    c.close()


class HealthLog:
    """Every status the router's health Watch stream sends for `service`, in order."""

    def __init__(self, address: str, service: str):
        self.statuses: list[int] = []
        self._changed = threading.Condition()
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                with self._changed:
                    self.statuses.append(reply.status)
                    self._changed.notify_all()
        except grpc.RpcError:
            pass  # cancelled by close()

    def wait_for(self, *sequence: int, timeout: float = RESTART_S) -> None:
        """Until the statuses sent so far hold `sequence` in order (not necessarily
        adjacent)."""
        def holds() -> bool:
            it = iter(self.statuses)
            return all(s in it for s in sequence)

        with self._changed:
            assert self._changed.wait_for(holds, timeout), (sequence, self.statuses)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds (a restart is counted just after the new process
    is up, and may already serve)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def check(address: str, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def served(cluster, hint=pb.DISAGGREGATION_ALWAYS):
    text, ids, final = collect(stub_for(cluster.address), greedy_request(PROMPT, 12,
                                                                         disaggregation=hint))
    return text, ids, final


def test_a_worker_whose_engine_loop_broke_is_replaced(cluster):
    before = served(cluster)[:2]
    old = cluster.procs["prefill-0"]
    whole, pool = HealthLog(cluster.address, ""), HealthLog(cluster.address, f"{SERVICE}/prefill")
    try:
        pool.wait_for(SERVING)
        old.worker.abort(BREAK)
        pool.wait_for(SERVING, NOT_SERVING, SERVING)
        # the decode worker prefills locally meanwhile: the service as a whole stays up
        assert NOT_SERVING not in whole.statuses, whole.statuses
    finally:
        whole.close()
        pool.close()
    wait_until(lambda: cluster.supervisor.restarts("prefill-0") == 1)
    assert not old.is_alive()
    assert cluster.procs["prefill-0"].pid != old.pid
    text, ids, final = served(cluster)
    assert (text, ids) == before and final.prefill_worker == "prefill-0"
    wait_cluster_idle(cluster)


def test_a_killed_worker_is_restarted_then_stays_down_past_its_bound(cluster):
    before = served(cluster)[:2]
    old = cluster.procs["decode-0"]
    health = HealthLog(cluster.address, "")
    try:
        health.wait_for(SERVING)
        cluster.kill_worker("decode-0")
        health.wait_for(SERVING, NOT_SERVING, SERVING)  # the only decode worker came back
    finally:
        health.close()
    wait_until(lambda: cluster.supervisor.restarts("decode-0") == 1)
    assert cluster.procs["decode-0"].pid != old.pid
    for hint in (pb.DISAGGREGATION_ALWAYS, pb.DISAGGREGATION_NEVER):
        text, ids, final = served(cluster, hint)
        assert (text, ids) == before and final.decode_worker == "decode-0"
    wait_cluster_idle(cluster)

    cluster.kill_worker("decode-0")  # its one restart is spent: it stays down
    wait_until(lambda: cluster.supervisor.is_down("decode-0")
               and check(cluster.address) == NOT_SERVING)
    assert check(cluster.address, SERVICE) == NOT_SERVING
    assert check(cluster.address, f"{SERVICE}/prefill") == SERVING
    assert not cluster.procs["decode-0"].is_alive()
    assert cluster.supervisor.restarts("decode-0") == 1
    with pytest.raises(grpc.RpcError) as e:
        served(cluster)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_cluster_idle(cluster)  # the prefill worker holds nothing
