"""Helpers of the gRPC tests: a greedy request, a whole streamed answer, an idle cluster."""

from __future__ import annotations

import time

import grpc

from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc import pdserve_pb2_grpc


def greedy_request(prompt: str = "", max_tokens: int = 16, **kw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, **kw)
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    return req


def collect(stub, request, timeout: float = 60.0):
    """(text, token ids, final) of one streamed request."""
    text, ids, final = "", [], None
    for response in stub.Generate(request, timeout=timeout):
        if response.HasField("final"):
            final = response.final
        else:
            text += response.chunk.text
            ids += response.chunk.token_ids
    return text, ids, final


def stub_for(address: str):
    return pdserve_pb2_grpc.PdServeStub(grpc.insecure_channel(address))


def wait_cluster_idle(cluster, timeout: float = 15.0) -> None:
    """Every worker reports all blocks free and no job (heartbeat loads are not enough:
    ask each worker)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        loads = {w: p.worker.load() for w, p in cluster.procs.items() if p.process.is_alive()}
        if all(load.is_idle for load in loads.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not idle: {loads}")


class LongRequest:
    """A long disaggregated request streaming in a thread; `victim` is the decode worker
    that holds it (from the router's status) once its tokens flow; `outcome` its gRPC code
    once it ended, with the token ids, text and final message it got."""

    PROMPT = "Count to a thousand:"

    def __init__(self, stub, max_tokens: int = 2000):
        import threading

        req = greedy_request(self.PROMPT, max_tokens, disaggregation=pb.DISAGGREGATION_ALWAYS)
        req.sampling.ignore_eos = True
        self.outcome: dict = {"ids": [], "text": "", "final": None}
        streaming = threading.Event()

        def run():
            try:
                for response in stub.Generate(req, timeout=120):
                    if response.HasField("final"):
                        self.outcome["final"] = response.final
                    elif response.chunk.token_ids:
                        self.outcome["ids"] += response.chunk.token_ids
                        self.outcome["text"] += response.chunk.text
                        streaming.set()
                self.outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                self.outcome["code"], self.outcome["details"] = e.code(), e.details()
            finally:
                streaming.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert streaming.wait(60) and "code" not in self.outcome, self.outcome  # decoding
        status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        busy = [w.worker_id for w in status.workers if w.role == "decode" and w.in_flight]
        assert len(busy) == 1, status
        self.victim = busy[0]


class Recorded:
    """A router handle (deploy.handles) that notes every call it passes on: (worker id,
    method, transfer id). Tests wrap the cluster's handles with it to see which worker was
    asked what."""

    def __init__(self, handle, calls: list):
        self._handle, self._calls = handle, calls

    async def reserve(self, order):
        self._calls.append((self._handle.worker_id, "reserve", order.transfer_id))
        return await self._handle.reserve(order)

    async def generate(self, order):
        self._calls.append((self._handle.worker_id, "generate", order.transfer_id))
        await self._handle.generate(order)

    async def submit(self, order):
        self._calls.append((self._handle.worker_id, "submit", order.transfer_id))
        await self._handle.submit(order)

    async def abort(self, transfer_id):
        self._calls.append((self._handle.worker_id, "abort", transfer_id))
        await self._handle.abort(transfer_id)
