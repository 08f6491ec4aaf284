"""A decode worker hangs (SIGSTOP) while it streams a request: within the heartbeat TTL
plus the call timeout (never at the client's deadline) the router drops the worker and the
request migrates to the other one, which finishes it, and new requests go there; after
SIGCONT the same process (same pid, no restart) rejoins the view and serves again, and
every worker ends idle: the hung worker frees the moved request's blocks once it runs,
when the router's abort (timed out, not withdrawn: deploy.handles) reaches it."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from helpers import wait_for
from rpc_helpers import LongRequest, collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow
ALWAYS = pb.DISAGGREGATION_ALWAYS
TTL_S, CALL_TIMEOUT_S, REFRESH_S = 1.5, 2.0, 0.2
# what the request may take to fail once its worker hangs, with a generous margin for a
# loaded 2-core machine; the client's own deadline is far beyond (LongRequest: 120 s)
BOUND_S = TTL_S + REFRESH_S + CALL_TIMEOUT_S + 20.0


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=2, num_blocks=256, heartbeat_s=0.2,
                       heartbeat_ttl_s=TTL_S, worker_call_timeout_s=CALL_TIMEOUT_S,
                       router=RouterConfig(refresh_s=REFRESH_S))
    c = LocalCluster(spec)
    yield c
    for proc in c.procs.values():  # never leave a stopped process behind
        if proc.process.is_alive():
            os.kill(proc.pid, signal.SIGCONT)
    c.close()


def listed(stub) -> set[str]:
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
    return {w.worker_id for w in status.workers}


def idle_in_view(stub, worker_id: str) -> bool:
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
    return any(w.worker_id == worker_id and w.running == 0 and w.free_blocks == w.total_blocks
               for w in status.workers)


class Streaming:
    """A long request streaming in a thread until `cancel()`; `first` is set at its first
    token."""

    def __init__(self, stub):
        req = greedy_request("Count to a thousand:", 2000, disaggregation=ALWAYS)
        req.sampling.ignore_eos = True
        self.call = stub.Generate(req, timeout=120)
        self.first = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            for response in self.call:
                if response.HasField("chunk") and response.chunk.token_ids:
                    self.first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code = e.code()
        finally:
            self.first.set()

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(30)


def test_a_hung_decode_workers_request_moves_in_bounded_time_and_the_worker_rejoins(
        cluster):
    stub = stub_for(cluster.address)
    long = LongRequest(stub, max_tokens=120)
    victim = long.victim
    survivor = "decode-1" if victim == "decode-0" else "decode-0"
    proc = cluster.procs[victim]
    pid = proc.pid

    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        # moved within the bound, then at most 120 tokens to decode on the survivor
        long.thread.join(BOUND_S + 60)
        ended_after = time.monotonic() - stopped
        assert not long.thread.is_alive(), f"the request still hangs after {ended_after}s"
        assert long.outcome["code"] == grpc.StatusCode.OK, long.outcome
        final = long.outcome["final"]
        assert final.migrations == 1 and final.decode_worker == survivor
        assert final.usage.completion_tokens == 120
        # out of the view (its heartbeat stopped), and new requests go to the other worker
        wait_for(lambda: victim not in listed(stub), 30, f"{victim} to leave the view")
        _, ids, final = collect(stub, greedy_request("Hello", 4, disaggregation=ALWAYS))
        assert final.decode_worker == survivor and len(ids) == 4
    finally:
        os.kill(pid, signal.SIGCONT)

    # the same process comes back: it frees the failed request's blocks (the router's
    # abort reaches it now), is listed again with that load, and serves
    wait_for(lambda: proc.worker.load().is_idle, 30, f"{victim} to free the request")
    assert proc.pid == pid and proc.process.is_alive()
    wait_for(lambda: idle_in_view(stub, victim), 30, f"{victim} to rejoin the view, idle")
    busy = Streaming(stub)  # one decode worker busy: the next request goes to the other
    try:
        assert busy.first.wait(60) and busy.code is None, busy.code
        status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        (holder,) = [w.worker_id for w in status.workers if w.role == "decode" and w.in_flight]
        _, ids, final = collect(stub, greedy_request("Hello", 4, disaggregation=ALWAYS))
        assert len(ids) == 4
        assert {holder, final.decode_worker} == {victim, survivor}, status
    finally:
        busy.cancel()
    wait_cluster_idle(cluster, timeout=60)
