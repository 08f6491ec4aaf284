"""One request's record flattened into the fields a user filters and aggregates on: what the
request log writes as JSON and the tracer puts on the request's span.

The stage timings are the final message's (`pb.Timing`); a request that ended without one
(failed, cancelled) gets the same breakdown from its last dispatch's stamps, as far as it
got. TPOT and SLO attainment follow vLLM's serving benchmark (DESIGN §6): TPOT = (E2EL -
TTFT) / (output tokens - 1); a request meets its SLO when it finished within both bounds
it set. A request that did not finish has no final message, so its SLO is unknown here
(null); attainment counts it as a miss (DESIGN §6).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.router.final import timing
from pdserve.router.observe import RequestRecord
from pdserve.rpc import pdserve_pb2 as pb

# the stage lengths of pb.Timing, in the order a request goes through them
STAGES_MS = ("router_queue_ms", "prefill_queue_ms", "prefill_compute_ms", "kv_transfer_ms",
             "decode_queue_ms", "first_token_ms", "decode_ms", "retry_ms")
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class RequestSummary:
    fields: dict  # JSON-ready: str, int, float, bool, None, list[str]

    @classmethod
    def of(cls, record: RequestRecord) -> RequestSummary:
        final = record.final
        last = record.dispatches[-1] if record.dispatches else None
        if final is not None:
            t = final.timing
        else:
            first = record.token_times[0][0] if record.token_times else 0.0
            t = timing(record.arrival, last.dispatched if last else 0.0, first, record.ended,
                       last.stamps if last else None)
        decode_worker = final.decode_worker if final else (last.decode_worker if last else "")
        prefill_worker = (final.prefill_worker if final
                          else (last.prefill_worker if last else ""))
        out = record.completion_tokens
        tpot_ms = t.decode_ms / (out - 1) if out > 1 and t.decode_ms else None
        fields = {
            "request_id": record.request_id,
            "trace_id": record.trace.trace_id_hex if record.trace else None,
            "outcome": record.outcome.value,
            "status": record.code or "OK",
            "error": record.error or None,
            "finish_reason": _FINISH.get(final.finish_reason) if final else None,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": out,
            "cached_prompt_tokens": final.usage.cached_prompt_tokens if final else None,
            "disaggregated": bool(prefill_worker),
            "prefill_worker": prefill_worker or None,
            "decode_worker": decode_worker or None,
            "transfer_ids": [d.transfer_id for d in record.dispatches],
            "attempts": final.attempts if final else len(record.dispatches),
            "migrations": final.migrations if final else None,
            "kv_resends": final.kv_resends if final else None,
            "e2e_ms": round((record.ended - record.arrival) * 1e3, 3),
            **{name: round(getattr(t, name), 3) for name in STAGES_MS},
            "tpot_ms": round(tpot_ms, 3) if tpot_ms is not None else None,
            **_slo(record, t.first_token_ms, tpot_ms),
        }
        return cls(fields)


def _slo(record: RequestRecord, ttft_ms: float, tpot_ms: float | None) -> dict:
    final = record.final
    if final is None or not (final.slo.HasField("ttft_ms") or final.slo.HasField("tpot_ms")):
        return {"slo_ttft_ms": None, "slo_tpot_ms": None, "slo_met": None}
    slo = final.slo
    met = True
    if slo.HasField("ttft_ms"):
        met &= ttft_ms <= slo.ttft_ms
    if slo.HasField("tpot_ms") and tpot_ms is not None:
        met &= tpot_ms <= slo.tpot_ms
    return {"slo_ttft_ms": slo.ttft_ms if slo.HasField("ttft_ms") else None,
            "slo_tpot_ms": slo.tpot_ms if slo.HasField("tpot_ms") else None,
            "slo_met": bool(met)}
