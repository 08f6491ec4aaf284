"""The final message of a Generate stream."""

from __future__ import annotations

import time

from pdserve.router.jobs import PrefillOutcome
from pdserve.router.validate import ValidRequest
from pdserve.rpc import pdserve_pb2 as pb


def final_response(request_id: str, req: ValidRequest, finish: str, completion_tokens: int,
                   stamps: dict | None, outcome: PrefillOutcome | None, arrival: float,
                   dispatched: float, first_token: float, decode_worker: str,
                   prefill_worker: str) -> pb.GenerateResponse:
    """The last message of a request's stream: finish reason, usage, and the timing
    breakdown from the router's own stamps, the decode worker's (`stamps`) and the prefill
    worker's (`outcome`; None when prefilled locally), all Unix seconds in one clock."""
    s = stamps or {}
    t = pb.Timing(arrival=arrival, dispatched=dispatched, first_token=first_token,
                  finished=time.time(), kv_received=s.get("kv_received", 0.0),
                  decode_admitted=s.get("decode_admitted", 0.0))
    if outcome is not None:
        t.prefill_start, t.prefill_end = outcome.prefill_start, outcome.prefill_end
    else:
        t.prefill_start = s.get("prefill_start", 0.0)
        t.prefill_end = s.get("prefill_end", 0.0)

    def ms(a: float, b: float) -> float:
        return max(0.0, (b - a) * 1e3) if a and b else 0.0

    t.router_queue_ms = ms(arrival, dispatched)
    t.prefill_queue_ms = ms(dispatched, t.prefill_start)
    t.prefill_compute_ms = ms(t.prefill_start, t.prefill_end)
    t.kv_transfer_ms = ms(t.prefill_end, t.kv_received)
    t.decode_queue_ms = ms(t.kv_received, t.decode_admitted)
    t.first_token_ms = ms(arrival, first_token)
    t.decode_ms = ms(first_token, t.finished)
    reason = pb.FINISH_REASON_LENGTH if finish == "length" else pb.FINISH_REASON_STOP
    slo = pb.Slo()
    if req.slo_ttft_ms is not None:
        slo.ttft_ms = req.slo_ttft_ms
    if req.slo_tpot_ms is not None:
        slo.tpot_ms = req.slo_tpot_ms
    usage = pb.Usage(prompt_tokens=len(req.prompt_token_ids),
                     completion_tokens=completion_tokens,
                     cached_prompt_tokens=outcome.num_cached_tokens if outcome else 0)
    return pb.GenerateResponse(final=pb.FinalResponse(
        request_id=request_id, finish_reason=reason, usage=usage, timing=t,
        disaggregated=bool(prefill_worker), prefill_worker=prefill_worker,
        decode_worker=decode_worker, slo=slo))
