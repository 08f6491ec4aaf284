"""The final message of a Generate stream."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pdserve.protocol import DecodeStamps, FinishReason, TokenChunk
from pdserve.router.validate import ValidRequest
from pdserve.rpc import pdserve_pb2 as pb

_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class Retries:
    """What it took to serve a request: dispatches, migrations, time in failed dispatches,
    KV re-sends."""

    attempts: int = 1
    migrations: int = 0
    retry_s: float = 0.0
    kv_resends: int = 0  # dispatches served by a prefill job's held KV, not a new prefill


def timing(arrival: float, dispatched: float, first_token: float, finished: float,
           stamps: DecodeStamps | None, retry_s: float = 0.0) -> pb.Timing:
    """The timing breakdown of a dispatch from the router's stamps and the decode worker's
    (`stamps`, which hold the prefill worker's too): every stage's Unix time (0.0 where it
    never happened) and its length in ms (0.0 where either end is unknown)."""
    t = pb.Timing(arrival=arrival, dispatched=dispatched, first_token=first_token,
                  finished=finished)
    if stamps is not None:
        t.prefill_start, t.prefill_end = stamps.prefill_start, stamps.prefill_end
        t.kv_received, t.decode_admitted = stamps.kv_received, stamps.decode_admitted

    def ms(a: float, b: float) -> float:
        return max(0.0, (b - a) * 1e3) if a and b else 0.0

    t.router_queue_ms = ms(arrival, dispatched)
    t.prefill_queue_ms = ms(dispatched, t.prefill_start)
    t.prefill_compute_ms = ms(t.prefill_start, t.prefill_end)
    t.kv_transfer_ms = ms(t.prefill_end, t.kv_received)
    t.decode_queue_ms = ms(t.kv_received, t.decode_admitted)
    t.first_token_ms = ms(arrival, first_token)
    t.decode_ms = ms(first_token, t.finished)
    t.retry_ms = retry_s * 1e3
    return t


def final_response(request_id: str, req: ValidRequest, finish: FinishReason,
                   completion_tokens: int, worker: TokenChunk, arrival: float,
                   dispatched: float, first_token: float, decode_worker: str,
                   prefill_worker: str, retries: Retries = Retries(),
                   predicted: tuple[float, float] = (0.0, 0.0)) -> pb.GenerateResponse:
    """The last message of a request's stream: finish reason, usage, and the timing
    breakdown from the router's own stamps and the decode worker's, all Unix seconds in one
    clock. `worker` is the latest chunk that came with the decode worker's stamps (which
    hold the prefill worker's too) and prefix-cache hits: the job's final chunk, or its
    first when a stop string ended the request earlier. `predicted`: admission's TTFT and
    TPOT (router.placement; 0.0 without a cost profile)."""
    t = timing(arrival, dispatched, first_token, time.time(), worker.stamps, retries.retry_s)
    t.predicted_ttft_ms, t.predicted_tpot_ms = (x * 1e3 for x in predicted)
    slo = pb.Slo()
    if req.slo_ttft_ms is not None:
        slo.ttft_ms = req.slo_ttft_ms
    if req.slo_tpot_ms is not None:
        slo.tpot_ms = req.slo_tpot_ms
    usage = pb.Usage(prompt_tokens=len(req.prompt_token_ids),
                     completion_tokens=completion_tokens,
                     cached_prompt_tokens=worker.num_cached_tokens)
    return pb.GenerateResponse(final=pb.FinalResponse(
        request_id=request_id, finish_reason=_REASONS[finish], usage=usage, timing=t,
        disaggregated=bool(prefill_worker), prefill_worker=prefill_worker,
        decode_worker=decode_worker, slo=slo, attempts=retries.attempts,
        migrations=retries.migrations, kv_resends=retries.kv_resends,
        kv_transfer_bytes=worker.kv_bytes))
