"""One OpenTelemetry trace per request, built by the router when the request ends.

The trace of a request (ids from router.tracecontext: the client's trace when it sent a
`traceparent`, else one of its own):

    request                      arrival -> end, on the router; the request's attributes
    └─ dispatch                  one per dispatch (a retry or migration adds one)
       ├─ router_queue           waiting for worker slots and decode blocks
       ├─ prefill_queue          order received -> first prefill chunk scheduled
       ├─ prefill                prefill compute, to the first token
       ├─ kv_transfer            prefill end -> every layer at the decode worker
       ├─ decode_admission       KV in place -> joined the running batch
       └─ decode                 admitted (or first token) -> the dispatch's end

`kv_transfer` and `decode_admission` exist only when a prefill worker served the dispatch;
a stage the dispatch never reached has no span. A request that did not finish has the
error status (`<gRPC code>: <message>`) on its request span, and a dispatch that a worker
failed has it on its dispatch span.

Why the router builds the whole trace rather than each worker exporting its own spans: the
workers already stamp every stage and send the stamps with the first and last chunk
(protocol.stamps, the hand-off note), so the router holds the whole timeline of each
request at its end. Building it there needs no trace context in the orders, no exporter
and no collector endpoint in each worker process (nor in each Ray actor), and adds no work
to the engine loop; the trace is whole even when the prefill worker died after the
hand-off, and a failed request's trace still shows the stages it reached. The price: spans
exist only at the stage granularity the stamps have (no per-layer or per-step spans), and
stage times on other machines are their clocks (NTP-aligned) placed on the router's.

Spans are made after the fact with explicit times (`ReadableSpan`, nanoseconds) and handed
to a span processor (`BatchSpanProcessor` over OTLP in production, `SimpleSpanProcessor`
over `InMemorySpanExporter` in tests). The tracer is a RequestObserver: it never blocks
the router (the batch processor exports from its own thread).
"""

from __future__ import annotations

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from pdserve.router.observe import Dispatch, RequestOutcome, RequestRecord
from pdserve.router.request_summary import RequestSummary
from pdserve.router.tracecontext import random_id

SCOPE = InstrumentationScope("pdserve.router")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _ns(t: float) -> int:
    return int(t * 1e9)


class _Trace:
    """The spans of one trace as they are built."""

    def __init__(self, trace_id: int, resource: Resource):
        self.trace_id, self.resource = trace_id, resource
        self.spans: list[ReadableSpan] = []

    def add(self, name: str, start: float, end: float, parent: SpanContext | None,
            attributes: dict, span_id: int | None = None, kind: SpanKind = SpanKind.INTERNAL,
            status: Status | None = None) -> SpanContext:
        context = SpanContext(self.trace_id, span_id or random_id(64), is_remote=False,
                              trace_flags=_SAMPLED)
        self.spans.append(ReadableSpan(
            name, context, parent, self.resource,
            {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()
             if v is not None}, kind=kind,
            status=status or Status(StatusCode.UNSET), start_time=_ns(start),
            end_time=_ns(max(start, end)), instrumentation_scope=SCOPE))
        return context


def request_spans(record: RequestRecord, resource: Resource) -> list[ReadableSpan]:
    """The spans of a request's trace (the module's tree), the request span first."""
    trace = record.trace
    if trace is None:
        raise ValueError(f"request {record.request_id} has no trace context")
    spans = _Trace(trace.trace_id, resource)
    parent = (SpanContext(trace.trace_id, trace.parent_span_id, is_remote=True,
                          trace_flags=_SAMPLED) if trace.parent_span_id else None)
    summary = RequestSummary.of(record).fields
    attributes = {f"pdserve.{k}": v for k, v in summary.items()
                  if k not in ("trace_id", "outcome", "status")}
    attributes.update({
        "gen_ai.request.id": record.request_id,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "gen_ai.response.finish_reasons": ([summary["finish_reason"]]
                                           if summary["finish_reason"] else None),
        "pdserve.outcome": record.outcome.value,
        "rpc.grpc.status_code": grpc.StatusCode[record.code].value[0] if record.code else 0,
    })
    ok = record.outcome is RequestOutcome.FINISHED
    root = spans.add("request", record.arrival, record.ended, parent, attributes,
                     span_id=trace.span_id, kind=SpanKind.SERVER,
                     status=None if ok else Status(StatusCode.ERROR, ": ".join(
                         part for part in (record.code, record.error) if part)))
    for i, dispatch in enumerate(record.dispatches):
        _dispatch_spans(spans, root, i + 1, dispatch)
    return spans.spans


def _dispatch_spans(spans: _Trace, parent: SpanContext, number: int, d: Dispatch) -> None:
    disagg = bool(d.prefill_worker)
    prefill_at = d.prefill_worker or d.decode_worker
    attributes = {"pdserve.transfer_id": d.transfer_id, "pdserve.dispatch": number,
                  "pdserve.prefill_worker": d.prefill_worker or None,
                  "pdserve.decode_worker": d.decode_worker or None,
                  "pdserve.disaggregated": disagg, "pdserve.error": d.error or None}
    status = Status(StatusCode.ERROR, d.error) if d.error else None
    ctx = spans.add("dispatch", d.started, d.ended, parent, attributes, status=status)
    if not d.dispatched:
        return
    spans.add("router_queue", d.started, d.dispatched, ctx, {})
    s = d.stamps
    if s is None:
        return
    # (name, start, end, worker): a stage whose ends were both stamped
    stages = [("prefill_queue", d.dispatched, s.prefill_start, prefill_at),
              ("prefill", s.prefill_start, s.prefill_end, prefill_at)]
    if disagg:
        stages += [("kv_transfer", s.prefill_end, s.kv_received, d.decode_worker),
                   ("decode_admission", s.kv_received, s.decode_admitted, d.decode_worker)]
    decode_start = s.decode_admitted or s.first_token or s.prefill_end
    stages.append(("decode", decode_start, d.ended, d.decode_worker))
    for name, start, end, worker in stages:
        if start and end:
            extra = ({"pdserve.from_worker": d.prefill_worker, "pdserve.to_worker": worker}
                     if name == "kv_transfer" else {})
            spans.add(name, start, end, ctx, {"pdserve.worker": worker,
                                              "pdserve.transfer_id": d.transfer_id, **extra})


class RequestTracer:
    """A RequestObserver that hands each request's spans to `processor` (unless the client
    sent an unsampled `traceparent`). `shutdown()` flushes and stops the processor."""

    def __init__(self, processor: SpanProcessor, resource: Resource | None = None):
        self.processor = processor
        self.resource = resource or Resource.create({"service.name": "pdserve"})

    def request_ended(self, record: RequestRecord) -> None:
        if record.trace is None or not record.trace.sampled:
            return
        for span in request_spans(record, self.resource):
            self.processor.on_end(span)

    def shutdown(self) -> None:
        self.processor.shutdown()


def otlp_tracer(endpoint: str, service_name: str = "pdserve",
                router_id: str = "router-0") -> RequestTracer:
    """A tracer exporting over OTLP/gRPC to `endpoint` (a collector, e.g.
    http://localhost:4317), in batches from its own thread."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service_name,
                                "service.instance.id": router_id})
    return RequestTracer(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)), resource)
