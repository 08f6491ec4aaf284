"""Serving metrics as vLLM's benchmark defines them, SLO attainment and goodput.

Per request (client side): TTFT = send -> first chunk with output; ITL = gaps between
successive chunks; E2EL = send -> last chunk; TPOT = (E2EL - TTFT) / (output tokens - 1).
A run's summary uses vLLM's key names (`request_throughput`, `mean_ttft_ms`, `p99_tpot_ms`,
...). A request that did not complete is either *refused* (turned away at the door before
any work: RESOURCE_EXHAUSTED from pdserve's admission or queue bound, HTTP 429) or *failed*
(anything else, including an error after admission); `completed + failed + refused =
num_prompts`, and `*_refusal_ms` is send -> the refusal, in vLLM's statistic shapes. Our own
keys are prefixed `slo_` (attainment over ALL issued requests: a failure or a refusal is a
miss; `slo_admitted_attainment` over the requests not refused) and `disagg_` (server-side
stages). Goodput (DistServe) is the highest request rate
whose attainment stays at or above the target, linearly interpolated between measured
rates, divided by the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# server-side stages a pdserve final message reports (Timing durations, ms)
STAGES = ("router_queue_ms", "prefill_queue_ms", "prefill_compute_ms", "kv_transfer_ms",
          "decode_queue_ms", "decode_ms")


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between chunks
    latency: float = 0.0  # E2EL, seconds; for a failure or refusal, send -> the error
    output_len: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # ms, from the server
    disaggregated: bool = False
    kv_window_s: float = 0.0  # prefill start -> all KV at the decode worker
    # KV bytes the decode worker received (0: not reported); less than the prompt's when
    # its prefix cache held the leading blocks
    kv_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens a prefix cache held (as the server reports)
    refused: bool = False  # turned away at admission, before any token (never a success)
    code: str = ""  # the failure's status: a gRPC code name or "HTTP <n>"

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    def met(self, r: RequestResult) -> bool:
        return r.success and self.ttft_met(r) and self.tpot_met(r)

    def ttft_met(self, r: RequestResult) -> bool:
        return r.success and r.ttft * 1e3 <= self.ttft_ms

    def tpot_met(self, r: RequestResult) -> bool:
        tpot = r.tpot
        return r.success and (tpot is None or tpot * 1e3 <= self.tpot_ms)


def _stats(prefix: str, values_ms: Sequence[float], percentiles: Sequence[float]) -> dict:
    arr = np.asarray(values_ms, dtype=float) if len(values_ms) else np.zeros(1)
    out = {f"mean_{prefix}_ms": float(arr.mean()), f"median_{prefix}_ms": float(np.median(arr)),
           f"std_{prefix}_ms": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}_{prefix}_ms"] = float(np.percentile(arr, p))
    return out


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None,
              percentiles: Sequence[float] = (50, 90, 99),
              kv_bytes_per_token: int = 0) -> dict:
    """One run's result dict (vLLM's keys plus `slo_*` and `disagg_*`)."""
    ok = [r for r in results if r.success]
    refused = [r for r in results if r.refused and not r.success]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    out: dict = {
        "duration": duration_s,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok) - len(refused),
        "refused": len(refused),
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(r.output_len for r in ok),
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": sum(r.output_len for r in ok) / duration_s if duration_s else 0.0,
        "total_token_throughput": (sum(r.prompt_len + r.output_len for r in ok) / duration_s
                                   if duration_s else 0.0),
    }
    out.update(_stats("ttft", [r.ttft * 1e3 for r in ok], percentiles))
    out.update(_stats("tpot", [t * 1e3 for t in tpots], percentiles))
    out.update(_stats("itl", [g * 1e3 for r in ok for g in r.itl], percentiles))
    out.update(_stats("e2el", [r.latency * 1e3 for r in ok], percentiles))
    out.update(_stats("refusal", [r.latency * 1e3 for r in refused], percentiles))
    if slo is not None:
        n = max(len(results), 1)
        good = sum(slo.met(r) for r in results)
        out.update({
            "request_goodput": good / duration_s if duration_s else 0.0,
            "slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms,
            "slo_attainment": good / n,
            # of the requests let in: what admission promises to keep
            "slo_admitted_attainment": good / max(len(results) - len(refused), 1),
            "slo_ttft_attainment": sum(slo.ttft_met(r) for r in results) / n,
            "slo_tpot_attainment": sum(slo.tpot_met(r) for r in results) / n,
        })
    staged = [r for r in ok if r.stages]
    for stage in STAGES:
        values = [r.stages.get(stage, 0.0) for r in staged]
        out[f"disagg_mean_{stage}"] = float(np.mean(values)) if values else 0.0
    out.update(prediction_errors(ok))
    moved = [r for r in ok if r.disaggregated]
    # what the server reports it moved, else what the whole prompt's KV would be
    kv_bytes = sum(r.kv_bytes or r.prompt_len * kv_bytes_per_token for r in moved)
    window = sum(r.kv_window_s for r in moved)
    out["disagg_requests"] = len(moved)
    out["disagg_prompt_tokens"] = sum(r.prompt_len for r in moved)
    out["cached_prompt_tokens"] = sum(r.cached_tokens for r in ok)
    out["disagg_kv_bytes"] = kv_bytes
    out["disagg_kv_gbps"] = kv_bytes / window / 1e9 if window > 0 else 0.0
    out["ttfts"] = [r.ttft for r in results]
    out["tpots"] = [r.tpot for r in results]
    out["output_lens"] = [r.output_len for r in results]
    out["input_lens"] = [r.prompt_len for r in results]
    out["errors"] = [r.error for r in results]
    # per request, for the predictions' error by placement: the router's predicted TTFT
    # and TPOT at admission (None: no prediction), its own TTFT (arrival to first token
    # sent) and whether the request was disaggregated
    out["predicted_ttfts_ms"] = [r.stages.get("predicted_ttft_ms") or None for r in results]
    out["predicted_tpots_ms"] = [r.stages.get("predicted_tpot_ms") or None for r in results]
    out["server_ttfts_ms"] = [r.stages.get("first_token_ms") or None for r in results]
    out["disaggregated"] = [r.disaggregated for r in results]
    return out


def prediction_errors(ok: Sequence[RequestResult]) -> dict:
    """How well the router predicted at admission each request's TTFT (its own, arrival to
    first token sent) and TPOT (as the client measures it): the median of |predicted -
    measured| / measured, and of the signed error (> 0: predicted too long), over the
    requests that carry a prediction."""
    out = {}
    for name, measured in (("ttft", lambda r: r.stages.get("first_token_ms")),
                           ("tpot", lambda r: r.tpot * 1e3 if r.tpot else None)):
        pairs = [(r.stages.get(f"predicted_{name}_ms"), measured(r)) for r in ok]
        errors = [(p - m) / m for p, m in pairs if p and m]
        out[f"predicted_{name}_requests"] = len(errors)
        out[f"predicted_{name}_median_abs_error"] = (float(np.median(np.abs(errors)))
                                                     if errors else None)
        out[f"predicted_{name}_median_error"] = float(np.median(errors)) if errors else None
    return out


def required_slo_scale(r: RequestResult, base: Slo) -> float:
    """The smallest multiple of `base` this request meets (inf for a failure)."""
    if not r.success:
        return math.inf
    tpot = r.tpot
    return max(r.ttft * 1e3 / base.ttft_ms, (tpot * 1e3 / base.tpot_ms) if tpot else 0.0)


def min_slo_scale(results: Sequence[RequestResult], base: Slo, target: float = 0.9) -> float:
    """The smallest scale s such that at least `target` of ALL requests meet s x base."""
    return scale_quantile([required_slo_scale(r, base) for r in results], target)


def scale_quantile(required: Sequence[float], target: float = 0.9) -> float:
    """The smallest scale met by at least `target` of requests with these required scales."""
    scales = sorted(required)
    if not scales:
        return math.inf
    return scales[max(math.ceil(target * len(scales)) - 1, 0)]


def attainment_rate(points: Sequence[tuple[float, float]], target: float = 0.9
                    ) -> tuple[float, str]:
    """Highest rate with attainment >= target from (rate, attainment) points, linearly
    interpolated at the first crossing below target. Returns (rate, note): note is "" for
    an interpolated crossing, "all above" when no measured rate fell below the target (the
    rate is then a lower bound: the highest measured), "none above" when even the lowest
    rate missed it (0.0)."""
    pts = sorted(points)
    if not pts:
        return 0.0, "none above"
    if pts[0][1] < target:
        return 0.0, "none above"
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < target <= a0:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0), ""
    return pts[-1][0], "all above"


def goodput_per_worker(points: Sequence[tuple[float, float]], num_workers: int,
                       target: float = 0.9) -> tuple[float, str]:
    rate, note = attainment_rate(points, target)
    return rate / num_workers, note
