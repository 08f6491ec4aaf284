"""Helpers of the gRPC tests: a greedy request, a whole streamed answer, an idle cluster."""

from __future__ import annotations

import time

import grpc

from rpc import pdserve_pb2 as pb
from rpc import pdserve_pb2_grpc


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
