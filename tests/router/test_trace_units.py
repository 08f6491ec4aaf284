"""Trace contexts and the spans of a request's record, without a cluster: a W3C
`traceparent` read and written, a retried request's trace, an unfinished request's log."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import StatusCode

from pdserve.protocol import DecodeStamps
from pdserve.router.observe import Dispatch, RequestOutcome, RequestRecord
from pdserve.router.request_log import RequestLog
from pdserve.router.tracecontext import TraceContext, parse_traceparent
from pdserve.router.tracing import request_spans

HEADER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_read_and_a_request_gets_its_own_span():
    assert parse_traceparent(HEADER) == (0x4bf92f3577b34da6a3ce929d0e0e4736,
                                         0x00f067aa0ba902b7, True)
    trace = TraceContext.start(HEADER)
    assert trace.trace_id == 0x4bf92f3577b34da6a3ce929d0e0e4736
    assert trace.parent_span_id == 0x00f067aa0ba902b7 != trace.span_id
    assert trace.traceparent() == f"00-{trace.trace_id:032x}-{trace.span_id:016x}-01"
    assert TraceContext.start(trace.traceparent()).trace_id == trace.trace_id
    assert not TraceContext.start(HEADER[:-2] + "00").sampled
    # a later version may append fields
    assert parse_traceparent(HEADER.replace("00-", "01-", 1) + "-more") is not None


@pytest.mark.parametrize("header", [
    "", "garbage", HEADER[:-1], HEADER.replace("00-", "ff-", 1), HEADER + "-more",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
])
def test_a_malformed_traceparent_starts_a_trace_of_its_own(header):
    assert parse_traceparent(header) is None
    trace = TraceContext.start(header)
    assert trace.parent_span_id == 0 and trace.trace_id and trace.span_id and trace.sampled


def test_metadata_without_a_traceparent_starts_a_new_trace():
    a = TraceContext.from_metadata((("user-agent", "x"),))
    b = TraceContext.from_metadata(None)
    assert a.trace_id != b.trace_id and a.parent_span_id == b.parent_span_id == 0
    assert TraceContext.from_metadata((("traceparent", HEADER),)).parent_span_id


def _retried_record() -> RequestRecord:
    """Failed on decode-0 before its first token, then served by prefill-1 and decode-1;
    cancelled by the client while decoding."""
    failed = Dispatch("r/1", 100.0, 100.5, 101.0, "decode-0", "prefill-0", None,
                      "UNAVAILABLE: worker decode-0 is gone")
    stamps = DecodeStamps(received=101.2, prefill_start=101.3, prefill_end=101.6,
                          kv_received=101.7, decode_admitted=101.8, first_token=101.9)
    served = Dispatch("r/2", 101.0, 101.1, 103.0, "decode-1", "prefill-1", stamps)
    return RequestRecord("r", RequestOutcome.CANCELLED, 99.9, 103.1, 12, 3,
                         ((101.95, 1), (102.5, 2)), None, "CANCELLED", "the client went away",
                         TraceContext.start(), (failed, served))


def test_a_retried_request_has_a_dispatch_span_each_and_stages_under_the_one_that_served():
    record = _retried_record()
    spans = request_spans(record, Resource.create({}))
    root = spans[0]
    assert root.name == "request" and root.context.span_id == record.trace.span_id
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "CANCELLED: the client went away"
    assert {s.context.trace_id for s in spans} == {record.trace.trace_id}
    first, second = [s for s in spans if s.name == "dispatch"]
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["pdserve.error"].startswith("UNAVAILABLE")
    assert second.status.status_code is StatusCode.UNSET
    under = {s.name: s for s in spans if s.parent and s.parent.span_id == second.context.span_id}
    assert list(under) == ["router_queue", "prefill_queue", "prefill", "kv_transfer",
                           "decode_admission", "decode"]
    assert under["prefill"].attributes["pdserve.worker"] == "prefill-1"
    assert (under["decode"].start_time, under["decode"].end_time) == (int(101.8 * 1e9),
                                                                       int(103.0 * 1e9))
    # the failed dispatch got no stamps: its queue only
    assert [s.name for s in spans if s.parent and s.parent.span_id == first.context.span_id
            ] == ["router_queue"]
    assert root.attributes["pdserve.transfer_ids"] == ("r/1", "r/2")
    assert root.attributes["pdserve.attempts"] == 2


def test_an_unfinished_request_logs_the_stages_it_reached():
    logger = logging.getLogger("test.request_log")
    logger.setLevel(logging.INFO)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    logger.addHandler(handler)
    try:
        RequestLog(logger).request_ended(_retried_record())
    finally:
        logger.removeHandler(handler)
    (entry,) = [json.loads(line) for line in lines]
    assert (entry["outcome"], entry["status"]) == ("cancelled", "CANCELLED")
    assert entry["finish_reason"] is None and entry["slo_met"] is None
    assert (entry["prefill_worker"], entry["decode_worker"]) == ("prefill-1", "decode-1")
    assert entry["prefill_compute_ms"] == pytest.approx(300.0)
    assert entry["kv_transfer_ms"] == pytest.approx(100.0)
    assert entry["first_token_ms"] == pytest.approx(2050.0)
    assert entry["attempts"] == 2 and entry["completion_tokens"] == 3
