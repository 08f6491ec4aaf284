"""The HTTP API and the metrics without workers: a router over an empty registry answers
503 and says so on /health and /metrics; the request metrics count records as the
contract says (histograms for finished requests, SLO misses for the rest, KV transfer
failures by cause)."""

from __future__ import annotations

import pytest
from http_helpers import get, post, scrape, value
from prometheus_client import CollectorRegistry

from pdserve.deploy.redis_server import RedisServer
from pdserve.deploy.router_thread import RouterThread
from pdserve.router.http import HttpConfig
from pdserve.router.metrics.requests import RequestMetrics, kv_failure_cause
from pdserve.router.observe import Dispatch, RequestOutcome, RequestRecord
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb


@pytest.fixture(scope="module")
def empty_router(smollm2_dir):
    redis = RedisServer()
    router = RouterThread(RouterConfig(), smollm2_dir, redis.url, connect=None,
                          http=HttpConfig(port=0, model_name="m"))
    yield f"http://{router.http_address}"
    router.close()
    redis.stop()


def test_no_live_worker_is_503_on_generation_and_health(empty_router):
    url = empty_router
    status, reply = post(url, "/v1/completions", {"model": "m", "prompt": "Hi"})
    assert status == 503 and reply["error"]["code"] == "unavailable", reply
    status, reply = post(url, "/v1/chat/completions", {
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 503, reply  # a stream answers its status before any event
    assert get(url, "/health")[0] == 503
    samples = scrape(url)
    assert value(samples, "pdserve:request_failure_total", outcome="failed",
                 code="UNAVAILABLE") == 2
    assert value(samples, "pdserve:time_to_first_token_seconds_count") == 0


def _record(outcome=RequestOutcome.FINISHED, final=None, **kw) -> RequestRecord:
    return RequestRecord("r", outcome, arrival=100.0, ended=101.0, prompt_tokens=10,
                         completion_tokens=3, final=final, **kw)


def _failed(error: str) -> Dispatch:
    """A dispatch that ended with `error` ("" for none)."""
    return Dispatch("r/t", 100.0, 100.0, 100.1, "decode-1", "prefill-0", None, error)


def _final(ttft_ms: float, tokens: int = 3) -> pb.FinalResponse:
    final = pb.FinalResponse(finish_reason=pb.FINISH_REASON_LENGTH, disaggregated=True,
                             kv_transfer_bytes=4096, attempts=2)
    final.usage.prompt_tokens, final.usage.completion_tokens = 10, tokens
    t = final.timing
    t.first_token_ms, t.prefill_start, t.kv_received, t.kv_transfer_ms = ttft_ms, 100.1, 100.3, 5
    return final


def test_request_metrics_count_what_the_records_say():
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    metrics.request_ended(_record(final=_final(200.0), token_times=(
        (100.2, 1), (100.3, 1), (100.5, 1)), slo_ttft_ms=500.0, slo_tpot_ms=100.0,
        dispatches=(_failed("UNAVAILABLE: the KV transfer to decode-1 failed: KV transfer "
                            "failed: lease expired: no KV nor keep-alive from the sender for "
                            "10 s"), _failed(""))))
    predicted = _final(900.0)
    predicted.timing.predicted_ttft_ms = 1000.0
    # 3 tokens over 100 ms after the first: 50 ms each, predicted 40 ms
    predicted.timing.decode_ms, predicted.timing.predicted_tpot_ms = 100.0, 40.0
    metrics.request_ended(_record(final=predicted, slo_ttft_ms=500.0))
    metrics.request_ended(_record(RequestOutcome.FAILED, code="UNAVAILABLE",
                                  slo_tpot_ms=50.0,
                                  dispatches=(_failed("UNAVAILABLE: worker decode-0 is gone"),)))

    def get_value(name, **labels):
        return registry.get_sample_value(name, labels)

    assert get_value("pdserve:time_to_first_token_seconds_count") == 2
    assert get_value("pdserve:inter_token_latency_seconds_count") == 2
    assert get_value("pdserve:kv_transfer_bytes_total") == 2 * 4096
    assert get_value("pdserve:request_retries_total", kind="dispatch") == 2
    assert get_value("pdserve:kv_transfer_failures_total", cause="lease_expired") == 1
    assert get_value("pdserve:request_failure_total", outcome="failed",
                     code="UNAVAILABLE") == 1
    # 3 carried an SLO: the first met its TTFT but not its TPOT ((1.0 - 0.2) / 2 = 400 ms),
    # the second missed its TTFT, the third failed
    assert get_value("pdserve:slo_requests_total") == 3
    assert get_value("pdserve:slo_met_total", slo="ttft") == 1
    assert get_value("pdserve:slo_met_total", slo="tpot") == 0
    assert get_value("pdserve:slo_met_total", slo="all") == 0
    # only the request the router predicted: 900 ms measured of 1,000 ms predicted
    assert get_value("pdserve:time_to_first_token_prediction_ratio_count") == 1
    assert get_value("pdserve:time_to_first_token_prediction_ratio_bucket", le="0.9") == 1
    assert get_value("pdserve:time_to_first_token_prediction_ratio_bucket", le="0.8") == 0
    assert get_value("pdserve:time_per_output_token_prediction_ratio_count") == 1
    assert get_value("pdserve:time_per_output_token_prediction_ratio_sum") == 1.25
    assert get_value("pdserve:prompt_tokens_total") == 30
    assert get_value("pdserve:generation_tokens_total") == 9


@pytest.mark.parametrize(("message", "cause"), [
    ("decode worker decode-0 ended the request: KV transfer failed: checksum mismatch in "
     "layer 3 [0, 16)", "checksum"),
    ("prefill on prefill-0 failed: KV transfer failed: handshake refused: dtype", "handshake"),
    ("prefill on prefill-0 failed: KV transfer failed: something new", "other"),
    ("worker decode-0 is gone", None),
])
def test_kv_failure_causes_are_a_bounded_label(message, cause):
    assert kv_failure_cause(message) == cause
