"""The router's own costs on this machine: a cost profile's `router_s` and `stream_s`.

A real 1 prefill + 1 decode cluster (deploy.local_cluster: embedded Redis, each worker in
its own process pinned to its own core with `threads` torch threads, the router and its gRPC
server in a thread of this process) serves short prompts one at a time, each disaggregated.
Per request, on one clock (time.time(): one machine):
- the client's TTFT runs from the Generate call to the first chunk's arrival;
- the server's stages come from the FinalResponse's timing;
- router_s = dispatched - call: the gRPC intake and the router's queue (its router_queue
  stage, the decode reservation included), until the order leaves for the prefill worker;
- stream_s = first chunk's arrival - decode_admitted: the first token's trip from the decode
  worker (which pushes it once the KV is in and the request admitted) through the router to
  the client.
So TTFT = router_s + prefill queue + prefill compute + KV transfer + decode queue + stream_s.
The prefill queue (at no load: the order's trip into the prefill worker's loop) is recorded
but is not part of router_s. Values are medians over the measured requests; one warm-up
request before them is not counted.

Then a batch: `BATCH` requests of `BATCH_OUTPUT` tokens sent together, so the decode worker
steps them side by side; their client-side TPOT (median) is what a decode step of that
batch costs in the serving path (the worker's loop, the token stream, the router and the
client beside it on this host), which `measure` sets against the engine's bare step.

Lifecycle: `measure_router(model, threads, requests, bar)` starts the cluster, waits until
the router lists both workers, measures, closes the cluster (also on error).
"""

from __future__ import annotations

import random
import statistics
import threading
import time

import grpc

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc import pdserve_pb2_grpc

PROMPT_TOKENS = 32
READY_TIMEOUT_S = 60.0
BATCH = 4
BATCH_OUTPUT = 48
STAGES = ("router_queue_ms", "prefill_queue_ms", "prefill_compute_ms", "kv_transfer_ms",
          "decode_queue_ms", "first_token_ms")


def _request(rng: random.Random, first: int, vocab: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=[first] + [rng.randrange(vocab)
                                                  for _ in range(PROMPT_TOKENS - 1)],
                             disaggregation=pb.DISAGGREGATION_ALWAYS)
    req.sampling.max_tokens, req.sampling.temperature = 2, 0.0
    req.sampling.ignore_eos = True
    return req


def _one(stub, req: pb.GenerateRequest) -> dict[str, float]:
    called = time.time()
    first_chunk, final = 0.0, None
    for response in stub.Generate(req, timeout=120):
        if response.HasField("final"):
            final = response.final
        elif not first_chunk:
            first_chunk = time.time()
    if final is None or not final.disaggregated:
        raise RuntimeError("the router did not serve the request disaggregated")
    t = final.timing
    out = {name: getattr(t, name) for name in STAGES}
    out.update(client_ttft_ms=(first_chunk - called) * 1e3,
               router_ms=(t.dispatched - called) * 1e3,
               stream_ms=(first_chunk - t.decode_admitted) * 1e3)
    return out


def _wait_ready(stub) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        roles = {w.role for w in stub.GetClusterStatus(pb.GetClusterStatusRequest()).workers}
        if {"prefill", "decode"} <= roles:
            return
        time.sleep(0.2)  # the workers' first heartbeats are on their way
    raise RuntimeError(f"the router did not list both workers within {READY_TIMEOUT_S}s")


def measure_router(model: str, vocab: int, threads: int, requests: int, bar) -> dict:
    """router_s, stream_s (seconds) and the stages' medians (ms) of `requests` requests
    whose token ids are below `vocab`; `bar` advances per request."""
    spec = ClusterSpec(model=model, prefill=1, decode=1, threads_per_worker=threads,
                       pin_cores=True, device="cpu")
    cluster = LocalCluster(spec)
    try:
        channel = grpc.insecure_channel(cluster.address)
        stub = pdserve_pb2_grpc.PdServeStub(channel)
        _wait_ready(stub)
        rng = random.Random(0)
        firsts = rng.sample(range(vocab), requests + 1)  # no two share a prefix
        runs = []
        for i, first in enumerate(firsts):
            run = _one(stub, _request(rng, first, vocab))
            if i:
                runs.append(run)
                bar.update()
        batch_tpot = _batch_tpot(stub, rng, vocab)
        channel.close()
    finally:
        cluster.close()
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"router_s": medians["router_ms"] / 1e3, "stream_s": medians["stream_ms"] / 1e3,
            "requests": requests, "prompt_tokens": PROMPT_TOKENS, "median_ms": medians,
            "batch": BATCH, "batch_output_tokens": BATCH_OUTPUT, "batch_tpot_s": batch_tpot}


def _batch_tpot(stub, rng: random.Random, vocab: int) -> float:
    """Median client-side TPOT of BATCH requests of BATCH_OUTPUT tokens sent together."""
    reqs = []
    for _ in range(BATCH):
        req = _request(rng, rng.randrange(vocab), vocab)
        req.sampling.max_tokens = BATCH_OUTPUT
        reqs.append(req)
    tpots: list[float] = []

    def one(req: pb.GenerateRequest) -> None:
        times = [time.perf_counter() for r in stub.Generate(req, timeout=300)
                 if not r.HasField("final")]
        if len(times) > 2:
            tpots.append((times[-1] - times[0]) / (len(times) - 1))

    threads = [threading.Thread(target=one, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not tpots:
        raise RuntimeError("no request of the batch streamed its tokens")
    return statistics.median(tpots)
