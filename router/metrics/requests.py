"""Per-request metrics, from what the router's observers hear when a request ends
(router.observe): vLLM's serving metrics under the `pdserve:` prefix, and what
disaggregation adds (the stages of the time to first token, KV transfer volume and failures,
where prompts were prefilled, SLO attainment).

What is counted where:
- latency histograms (TTFT, inter-token, TPOT, end to end, the stages): FINISHED requests,
  one observation each (inter-token: one per gap between token chunks), so each histogram's
  count is the number of requests served;
- token counters: every request that reached a worker (prompt tokens) and every token the
  router streamed (generation tokens), finished or not;
- `request_success_total` by finish reason; `request_failure_total` by outcome and status;
- KV transfer bytes and throughput: the attempt that served a finished request, as its
  decode worker reported receiving them;
- SLO attainment: every request that carried an SLO; one that did not finish misses it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from pdserve.router.observe import RequestOutcome, RequestRecord
from pdserve.rpc import pdserve_pb2 as pb

PREFIX = "pdserve:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and alerts carry over
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0, 120.0)
GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_USUAL_FAILURES = ((RequestOutcome.REFUSED, "RESOURCE_EXHAUSTED"),
                   (RequestOutcome.INVALID, "INVALID_ARGUMENT"),
                   (RequestOutcome.FAILED, "UNAVAILABLE"),
                   (RequestOutcome.CANCELLED, "CANCELLED"))
_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# what a KV transfer failure's reason says (kvtransfer), as a bounded label
_KV_CAUSES = (("lease expired", "lease_expired"), ("checksum", "checksum"),
              ("handshake", "handshake"), ("deadline", "deadline"), ("gone", "worker_gone"),
              ("closed", "worker_gone"), ("missing tokens", "incomplete"),
              ("do not fit", "no_room"))


def kv_failure_cause(message: str) -> str | None:
    """The cause label of a failed dispatch's message when a KV transfer failed, else
    None."""
    if "KV transfer" not in message:
        return None
    reason = message.lower()
    return next((label for text, label in _KV_CAUSES if text in reason), "other")


class RequestMetrics:
    """A RequestObserver (router.observe) that feeds its metrics into `registry`."""

    def __init__(self, registry: CollectorRegistry):
        def histogram(name: str, doc: str, buckets, labels=()) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=registry, buckets=buckets)

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Arrival at the router to the first token sent.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Gaps between a request's token chunks at the router.",
                             ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "(E2E - TTFT) / (output tokens - 1), per request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Arrival at the router to the final message.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Time in the router queue, waiting for worker slots and blocks.",
                               REQUEST_BUCKETS)
        self.prefill_queue = histogram("prefill_queue_time_seconds",
                                       "Dispatch to the start of the prompt's prefill.",
                                       STAGE_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds",
                                 "Prefill compute: its start to the first token sampled.",
                                 STAGE_BUCKETS)
        self.kv_time = histogram("kv_transfer_time_seconds",
                                 "End of prefill to all KV at the decode worker (the part of "
                                 "the transfer that compute did not hide); disaggregated "
                                 "requests only.", STAGE_BUCKETS)
        self.kv_gbps = histogram("kv_transfer_throughput_gigabytes_per_second",
                                 "KV bytes over the time they moved in (prefill start to all "
                                 "KV received); disaggregated requests only.", GBPS_BUCKETS)
        self.admission = histogram("decode_admission_time_seconds",
                                   "All KV at the decode worker to joining its running batch.",
                                   STAGE_BUCKETS)
        self.decode = histogram("request_decode_time_seconds",
                                "First token to the final message.", REQUEST_BUCKETS)
        self.ttft_prediction = histogram(
            "time_to_first_token_prediction_ratio", "Measured over predicted time to first "
            "token, for requests the router placed by its cost profile (1: exact).",
            RATIO_BUCKETS)
        self.tpot_prediction = histogram(
            "time_per_output_token_prediction_ratio", "Measured over predicted time per "
            "output token, for requests the router placed by its cost profile (1: exact).",
            RATIO_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request.",
                                    TOKEN_BUCKETS)
        self.output_len = histogram("request_generation_tokens",
                                    "Generated tokens per request.", TOKEN_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests dispatched.")
        self.generation_tokens = counter("generation_tokens", "Tokens streamed to clients.")
        self.success = counter("request_success", "Requests finished, by finish reason.",
                               ("finished_reason",))
        self.failure = counter("request_failure", "Requests that ended without finishing, "
                               "by outcome (refused, invalid, failed, cancelled) and gRPC "
                               "status.", ("outcome", "code"))
        self.prefill_mode = counter("requests_prefill", "Finished requests by where their "
                                    "prompt was prefilled: a prefill worker (disaggregated) or "
                                    "the worker that decoded it (local).", ("mode",))
        self.kv_bytes = counter("kv_transfer_bytes", "KV bytes decode workers received for "
                                "the requests they finished.")
        self.kv_failures = counter("kv_transfer_failures", "Dispatches whose KV transfer "
                                   "failed, by cause.", ("cause",))
        self.retries = counter("request_retries", "Dispatches again after a worker failed a "
                               "request before its first token, or migrations after it.",
                               ("kind",))
        self.kv_resends = counter("kv_resends", "Dispatches served by a prefill worker's held "
                                  "KV instead of a new prefill.")
        self.slo_requests = counter("slo_requests", "Requests that carried an SLO.")
        self.slo_met = counter("slo_met", "Requests that carried an SLO and finished within "
                               "it: `ttft`, `tpot` (each of those it set), `all` (every one "
                               "it set).", ("slo",))
        # every bounded label value shows from the start: a dashboard's rate() sees 0, not
        # a missing series
        for reason in _REASONS.values():
            self.success.labels(reason)
        for mode in ("disaggregated", "local"):
            self.prefill_mode.labels(mode)
        for cause in {label for _, label in _KV_CAUSES} | {"other"}:
            self.kv_failures.labels(cause)
        for kind in ("dispatch", "migration"):
            self.retries.labels(kind)
        for slo in ("ttft", "tpot", "all"):
            self.slo_met.labels(slo)
        for outcome, code in _USUAL_FAILURES:
            self.failure.labels(outcome.value, code)

    def request_ended(self, record: RequestRecord) -> None:
        if record.outcome not in (RequestOutcome.REFUSED, RequestOutcome.INVALID):
            self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        for dispatch in record.dispatches:
            if dispatch.error and (cause := kv_failure_cause(dispatch.error)) is not None:
                self.kv_failures.labels(cause).inc()
        final = record.final
        if record.outcome is not RequestOutcome.FINISHED or final is None:
            self.failure.labels(record.outcome.value, record.code).inc()
            self._slo(record, ttft_ok=False, tpot_ok=False)
            return
        self.success.labels(_REASONS.get(final.finish_reason, "unknown")).inc()
        self._latencies(record, final)
        t = final.timing
        self.prefill_mode.labels("disaggregated" if final.disaggregated else "local").inc()
        if final.disaggregated:
            self.kv_bytes.inc(final.kv_transfer_bytes)
            if t.kv_received:
                self.kv_time.observe(t.kv_transfer_ms / 1e3)
            window = t.kv_received - t.prefill_start
            if final.kv_transfer_bytes and t.prefill_start and window > 0:
                self.kv_gbps.observe(final.kv_transfer_bytes / window / 1e9)
        retries = final.attempts - 1 - final.migrations
        if retries > 0:
            self.retries.labels("dispatch").inc(retries)
        if final.migrations:
            self.retries.labels("migration").inc(final.migrations)
        if final.kv_resends:
            self.kv_resends.inc(final.kv_resends)

    def _latencies(self, record: RequestRecord, final: pb.FinalResponse) -> None:
        t = final.timing
        ttft = t.first_token_ms / 1e3
        e2e = max(0.0, record.ended - record.arrival)
        n = final.usage.completion_tokens
        self.ttft.observe(ttft)
        if t.predicted_ttft_ms > 0:
            self.ttft_prediction.observe(t.first_token_ms / t.predicted_ttft_ms)
        if t.predicted_tpot_ms > 0 and n > 1:
            self.tpot_prediction.observe(t.decode_ms / (n - 1) / t.predicted_tpot_ms)
        self.e2e.observe(e2e)
        self.queue.observe(t.router_queue_ms / 1e3)
        self.prefill_queue.observe(t.prefill_queue_ms / 1e3)
        self.prefill.observe(t.prefill_compute_ms / 1e3)
        self.admission.observe(t.decode_queue_ms / 1e3)
        self.decode.observe(t.decode_ms / 1e3)
        self.prompt_len.observe(final.usage.prompt_tokens)
        self.output_len.observe(n)
        if n > 1:
            self.tpot.observe(max(0.0, e2e - ttft) / (n - 1))
        times = [at for at, _ in record.token_times]
        for before, after in zip(times, times[1:], strict=False):
            self.itl.observe(after - before)
        self._slo(record, ttft_ok=ttft * 1e3 <= (record.slo_ttft_ms or float("inf")),
                  tpot_ok=n <= 1 or (e2e - ttft) / (n - 1) * 1e3
                  <= (record.slo_tpot_ms or float("inf")))

    def _slo(self, record: RequestRecord, ttft_ok: bool, tpot_ok: bool) -> None:
        given = [(name, ok) for name, ok, slo in (("ttft", ttft_ok, record.slo_ttft_ms),
                                                  ("tpot", tpot_ok, record.slo_tpot_ms))
                 if slo is not None]
        if not given:
            return
        self.slo_requests.inc()
        for name, ok in given:
            if ok:
                self.slo_met.labels(name).inc()
        if all(ok for _, ok in given):
            self.slo_met.labels("all").inc()
