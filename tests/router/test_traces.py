"""Per-request traces and the request log end to end: real worker processes, real Redis, the
router's gRPC server, spans caught by the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from helpers import wait_for
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from rpc_helpers import greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.router.request_log import LOGGER, log_requests_to
from pdserve.router.router import RouterConfig
from pdserve.router.tracecontext import parse_traceparent
from pdserve.router.tracing import RequestTracer
from pdserve.rpc import pdserve_pb2 as pb

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
DISAGG_STAGES = ["router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_admission",
                 "decode"]
LOCAL_STAGES = ["router_queue", "prefill_queue", "prefill", "decode"]


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=1, colocated=1, num_blocks=256,
                       router=RouterConfig(disaggregation_threshold=4))
    c = LocalCluster(spec)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(cluster):
    return stub_for(cluster.address)


@pytest.fixture
def exporter(cluster):
    """Every span of the requests this test sends (the router's tracer, in memory)."""
    exporter = InMemorySpanExporter()
    tracer = RequestTracer(SimpleSpanProcessor(exporter))
    observers = cluster.routers[0].router.observers
    observers.append(tracer)
    yield exporter
    observers.remove(tracer)
    wait_cluster_idle(cluster)


def generate(stub, request, metadata=()):
    """(token ids, final message, trailing traceparent) of one streamed request."""
    call = stub.Generate(request, timeout=60, metadata=metadata)
    ids, final = [], None
    for response in call:
        if response.HasField("final"):
            final = response.final
        else:
            ids += response.chunk.token_ids
    return ids, final, dict(call.trailing_metadata())["traceparent"]


def trace_of(exporter, request_id: str) -> dict:
    """The spans of a request's trace by name (a name that repeats: a list), once its
    request span is exported."""
    def spans():
        roots = [s for s in exporter.get_finished_spans()
                 if s.name == "request" and s.attributes["gen_ai.request.id"] == request_id]
        if not roots:
            return None
        trace_id = roots[0].context.trace_id
        return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]

    by_name: dict = {}
    for span in wait_for(spans, 10, f"the trace of {request_id}"):
        by_name.setdefault(span.name, []).append(span)
    return by_name


def stage_chain(trace: dict, names: list[str]):
    """The stage spans of the trace's one dispatch, checked to be children of the dispatch,
    the dispatch a child of the request span, and the stages back to back in time."""
    (root,), (dispatch,) = trace["request"], trace["dispatch"]
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert dispatch.parent.span_id == root.context.span_id
    stages = [trace[name][0] for name in names]
    assert not set(trace) - {"request", "dispatch", *names}, sorted(trace)
    for span in stages:
        assert span.parent.span_id == dispatch.context.span_id, span.name
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time, span.name
    for before, after in zip(stages, stages[1:], strict=False):
        assert before.end_time == after.start_time, (before.name, after.name)
    return root, dispatch, {span.name: span for span in stages}


def test_a_disaggregated_request_is_one_trace_of_its_stages(stub, exporter):
    req = greedy_request(PROMPT, 6, request_id="traced", disaggregation=pb.DISAGGREGATION_ALWAYS)
    ids, final, traceparent = generate(stub, req)
    trace = trace_of(exporter, "traced")
    root, dispatch, stages = stage_chain(trace, DISAGG_STAGES)
    # the id the client got is the trace's
    trace_id, span_id, sampled = parse_traceparent(traceparent)
    assert (trace_id, span_id, sampled) == (root.context.trace_id, root.context.span_id, True)
    a = root.attributes
    assert a["pdserve.prefill_worker"] == final.prefill_worker == "prefill-0"
    assert a["pdserve.decode_worker"] == final.decode_worker == "decode-0"
    assert a["pdserve.disaggregated"] is True and a["pdserve.attempts"] == 1
    assert a["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == len(ids) == 6
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["pdserve.outcome"] == "finished" and a["rpc.grpc.status_code"] == 0
    assert root.status.status_code is StatusCode.UNSET
    (tid,) = a["pdserve.transfer_ids"]
    assert tid.startswith("traced/") and dispatch.attributes["pdserve.transfer_id"] == tid
    assert stages["prefill"].attributes["pdserve.worker"] == "prefill-0"
    assert stages["kv_transfer"].attributes["pdserve.from_worker"] == "prefill-0"
    assert stages["kv_transfer"].attributes["pdserve.to_worker"] == "decode-0"
    assert stages["decode"].attributes["pdserve.worker"] == "decode-0"
    # the spans are the final message's stamps
    t = final.timing
    assert stages["prefill"].start_time == int(t.prefill_start * 1e9)
    assert stages["kv_transfer"].end_time == int(t.kv_received * 1e9)


def test_a_colocated_request_has_no_kv_transfer(stub, exporter):
    req = greedy_request(PROMPT, 4, request_id="local", disaggregation=pb.DISAGGREGATION_NEVER)
    _, final, _ = generate(stub, req)
    root, dispatch, stages = stage_chain(trace_of(exporter, "local"), LOCAL_STAGES)
    assert not final.disaggregated and root.attributes["pdserve.disaggregated"] is False
    assert "pdserve.prefill_worker" not in root.attributes
    assert {s.attributes["pdserve.worker"] for s in stages.values() if s.name != "router_queue"
            } == {final.decode_worker}


def test_failed_and_cancelled_requests_have_an_error_status(stub, exporter, cluster):
    # more KV than any worker holds: refused at the door, never dispatched
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, pb.GenerateRequest(prompt="word " * 5000, request_id="too-long"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trace = trace_of(exporter, "too-long")
    assert list(trace) == ["request"]
    (root,) = trace["request"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == f"INVALID_ARGUMENT: {err.value.details()}"
    assert root.attributes["pdserve.outcome"] == "invalid"
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert root.attributes["pdserve.transfer_ids"] == ()

    req = greedy_request(PROMPT, 400, request_id="gone", disaggregation=1)
    req.sampling.ignore_eos = True
    call = stub.Generate(req, timeout=60)
    next(call)
    next(call)
    call.cancel()
    trace = trace_of(exporter, "gone")
    (root,) = trace["request"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description.startswith("CANCELLED")
    # what it reached before the client left is in its trace
    assert {"router_queue", "prefill", "kv_transfer", "decode"} <= set(trace)


def test_a_client_traceparent_puts_the_request_in_the_clients_trace(stub, exporter):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    req = greedy_request(PROMPT, 2, request_id="joined")
    _, _, traceparent = generate(stub, req, metadata=(("traceparent", parent),))
    (root,) = trace_of(exporter, "joined")["request"]
    assert root.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert root.parent.span_id == 0xb7ad6b7169203331 and root.parent.is_remote
    assert parse_traceparent(traceparent)[:2] == (root.context.trace_id, root.context.span_id)
    # unsampled by the client: the router exports nothing of it (its observers have run
    # once the stream ended: the status goes out after the router's generator returned)
    req = greedy_request(PROMPT, 2, request_id="unsampled")
    generate(stub, req, metadata=(("traceparent", parent[:-2] + "00"),))
    assert not [s for s in exporter.get_finished_spans()
                if s.attributes.get("gen_ai.request.id") == "unsampled"]


@pytest.fixture
def request_log():
    stream = io.StringIO()
    handler = log_requests_to(stream)
    yield stream
    log = logging.getLogger(LOGGER)
    log.removeHandler(handler)
    log.setLevel(logging.NOTSET)
    log.propagate = True


def test_the_request_log_is_one_json_line_matching_the_final_message(stub, request_log):
    req = greedy_request(PROMPT, 5, request_id="logged", disaggregation=1,
                         slo=pb.Slo(ttft_ms=600_000, tpot_ms=600_000))
    ids, final, traceparent = generate(stub, req)
    line = request_log.getvalue()  # written before the stream ended (see above)
    assert line.count("\n") == 1
    entry = json.loads(line)
    t = final.timing
    assert entry["request_id"] == final.request_id == "logged"
    assert entry["trace_id"] == f"{parse_traceparent(traceparent)[0]:032x}"
    assert (entry["outcome"], entry["status"], entry["error"]) == ("finished", "OK", None)
    assert entry["finish_reason"] == "length"
    assert entry["prompt_tokens"] == final.usage.prompt_tokens
    assert entry["completion_tokens"] == final.usage.completion_tokens == len(ids)
    assert entry["cached_prompt_tokens"] == final.usage.cached_prompt_tokens
    assert (entry["prefill_worker"], entry["decode_worker"]) == ("prefill-0", "decode-0")
    assert entry["disaggregated"] is True
    assert (entry["attempts"], entry["migrations"], entry["kv_resends"]) == (1, 0, 0)
    assert len(entry["transfer_ids"]) == 1 and entry["transfer_ids"][0].startswith("logged/")
    for stage in ("router_queue_ms", "prefill_queue_ms", "prefill_compute_ms",
                  "kv_transfer_ms", "decode_queue_ms", "first_token_ms", "decode_ms"):
        assert entry[stage] == round(getattr(t, stage), 3), stage
    assert entry["tpot_ms"] == pytest.approx(t.decode_ms / (len(ids) - 1), abs=1e-3)
    assert entry["e2e_ms"] >= entry["first_token_ms"] > 0
    assert (entry["slo_ttft_ms"], entry["slo_tpot_ms"], entry["slo_met"]) == (
        600_000, 600_000, True)
