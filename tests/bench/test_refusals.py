"""Refusals at the door are counted apart from failures: the metric keys (`refused`,
`*_refusal_ms`, `slo_admitted_attainment`), and how the gRPC backend classifies what a
router answers (a tiny in-process gRPC server plays the router)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.bench.backends import PdServeBackend
from pdserve.bench.metrics import RequestResult, Slo, summarize
from pdserve.bench.workload import Sample
from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc import pdserve_pb2_grpc


def ok(ttft: float, latency: float, n: int) -> RequestResult:
    return RequestResult(10, True, "", ttft, [(latency - ttft) / (n - 1)] * (n - 1), latency, n)


def refused(latency: float) -> RequestResult:
    return RequestResult(10, False, "RESOURCE_EXHAUSTED: x", latency=latency, refused=True,
                         code="RESOURCE_EXHAUSTED")


def test_refused_requests_are_neither_completed_nor_failed_and_their_latency_is_reported():
    results = [ok(0.1, 1.0, 10), ok(0.5, 1.0, 10), refused(0.002), refused(0.004),
               RequestResult(10, False, "UNAVAILABLE: gone", code="UNAVAILABLE")]
    s = summarize(results, 2.0, Slo(ttft_ms=200, tpot_ms=200))
    assert (s["completed"], s["failed"], s["refused"]) == (2, 1, 2)
    assert s["completed"] + s["failed"] + s["refused"] == s["num_prompts"] == 5
    assert s["mean_refusal_ms"] == pytest.approx(3.0)
    assert s["p99_refusal_ms"] == pytest.approx(4.0, abs=0.05)
    assert s["slo_attainment"] == pytest.approx(1 / 5)  # of ALL issued: refusals are misses
    assert s["slo_admitted_attainment"] == pytest.approx(1 / 3)  # of the 3 let in
    # the refusals' latency does not leak into the served requests' E2EL
    assert s["mean_e2el_ms"] == pytest.approx(1000.0)


def test_no_refusal_gives_zero_refusal_statistics_and_attainment_over_all():
    s = summarize([ok(0.1, 1.0, 10)], 1.0, Slo(200, 200))
    assert s["refused"] == 0 and s["mean_refusal_ms"] == 0.0
    assert s["slo_admitted_attainment"] == s["slo_attainment"] == 1.0


class FakeRouter(pdserve_pb2_grpc.PdServeServicer):
    """The first prompt token picks the behaviour; remembers the SLOs it was sent."""

    def __init__(self):
        self.slos: list[tuple[float, float]] = []

    async def Generate(self, request, context):
        self.slos.append((request.slo.ttft_ms, request.slo.tpot_ms))
        how = request.token_ids[0]
        if how == 1:  # refused at the door
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused at admission: x")
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[7], text="a"))
        if how == 2:  # let in, then turned away: a failure after admission
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "late")
        if how == 3:  # an OK status with no final message
            return
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[8], text="b"))
        final = pb.FinalResponse(usage=pb.Usage(prompt_tokens=1, completion_tokens=2))
        yield pb.GenerateResponse(final=final)


async def _send_all(prompts, slo):
    server = grpc.aio.server()
    router = FakeRouter()
    pdserve_pb2_grpc.add_PdServeServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    backend = PdServeBackend(f"127.0.0.1:{port}", slo=slo)
    try:
        return [await backend.send(Sample(p, 2)) for p in prompts], router.slos
    finally:
        await backend.close()
        await server.stop(None)


def test_grpc_backend_tells_a_refusal_from_a_late_failure_and_a_missing_final():
    results, slos = asyncio.run(_send_all([(1,), (2,), (3,), (4,)], Slo(1500.0, 80.0)))
    door, late, no_final, served = results
    assert door.refused and not door.success and door.code == "RESOURCE_EXHAUSTED"
    assert 0 < door.latency < 5 and "refused at admission" in door.error
    assert not late.refused and not late.success and late.code == "RESOURCE_EXHAUSTED"
    assert not no_final.success and not no_final.refused and no_final.code == "NO_FINAL"
    assert served.success and served.output_len == 2 and not served.refused
    assert slos == [(1500.0, 80.0)] * 4  # the SLO went with every request
    s = summarize(results, 1.0)
    assert (s["completed"], s["failed"], s["refused"]) == (1, 2, 1)


def test_grpc_backend_sends_no_slo_unless_given():
    _, slos = asyncio.run(_send_all([(4,)], None))
    assert slos == [(0.0, 0.0)]
