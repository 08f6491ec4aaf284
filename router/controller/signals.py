"""What one router tells the cluster's controller: its queue, and over the last `window_s`
the requests that ended, the refusals (those for a slow decode batch apart), and SLO
attainment (a RequestObserver, router.observe). Every router publishes its own
(router.controller.store); the controller sums them.

SLO attainment follows DESIGN §6 as the request summary computes it
(router.request_summary): TTFT as the first token's, TPOT = (E2EL - TTFT) / (output tokens
- 1); a request with an SLO that did not finish (failed, cancelled) misses it. A TTFT miss
is the decode side's when more than half its first token's time went to the decode side
(the KV's transfer and its admission into the decode batch, as its stages report them);
a wait in the router's queue is not counted for either side, since a slot of either role
may be what it waited for. The SLOs asked for are summed, for the controller to judge by
their mean. The prompt tokens the requests that ended had computed (those a prefix cache
served left out; a refusal computed none) tell the controller how busy prompts kept the
workers that take them over the window, whether or not any prompt is queued at the
instant it looks.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.router.controller.decide import RouterSignals
from pdserve.router.observe import RequestOutcome, RequestRecord, Shortage
from pdserve.router.request_summary import RequestSummary


@dataclass(frozen=True)
class _Ended:
    time: float
    finished: bool
    refused: bool
    refused_decode: bool  # refused for the decode batch it would join
    ttft: bool | None  # None: no TTFT SLO; else whether it was met
    tpot: bool | None
    ttft_decode: bool = False  # a TTFT miss that waited mostly for the decode side
    slo_ttft_ms: float = 0.0  # where `ttft` is not None
    slo_tpot_ms: float = 0.0  # where `tpot` is not None
    prompt_tokens: int = 0  # computed for it (a prefix cache's tokens left out)


class SignalWindow:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.time):
        self.window_s = window_s
        self._clock = clock
        self._ended: collections.deque[_Ended] = collections.deque()

    def request_ended(self, record: RequestRecord) -> None:
        finished = record.outcome is RequestOutcome.FINISHED
        ttft = tpot = None
        decode_side = False
        if finished and (record.slo_ttft_ms is not None or record.slo_tpot_ms is not None):
            f = RequestSummary.of(record).fields
            if record.slo_ttft_ms is not None:
                ttft = f["first_token_ms"] <= record.slo_ttft_ms
                decode_wait = f["kv_transfer_ms"] + f["decode_queue_ms"]
                decode_side = not ttft and 2 * decode_wait > f["first_token_ms"]
            if record.slo_tpot_ms is not None:
                tpot = f["tpot_ms"] is None or f["tpot_ms"] <= record.slo_tpot_ms
        elif record.outcome is not RequestOutcome.REFUSED:
            ttft = False if record.slo_ttft_ms is not None else None
            tpot = False if record.slo_tpot_ms is not None else None
        refused = record.outcome is RequestOutcome.REFUSED
        cached = record.final.usage.cached_prompt_tokens if record.final is not None else 0
        self._ended.append(_Ended(
            self._clock(), finished, refused, refused and record.short_of is Shortage.DECODE,
            ttft, tpot, decode_side, record.slo_ttft_ms if ttft is not None else 0.0,
            record.slo_tpot_ms if tpot is not None else 0.0,
            0 if refused else max(0, record.prompt_tokens - cached)))
        self._expire()

    def front_end_refused(self) -> None:
        """A refusal the front end made before the router saw the request."""
        self._ended.append(_Ended(self._clock(), False, True, False, None, None))

    def signals(self, queued: int = 0, queued_tokens: int = 0) -> RouterSignals:
        self._expire()
        e = self._ended
        return RouterSignals(
            queued=queued, queued_tokens=queued_tokens,
            finished=sum(x.finished for x in e), refused=sum(x.refused for x in e),
            refused_decode=sum(x.refused_decode for x in e),
            ttft_requests=sum(x.ttft is not None for x in e),
            ttft_misses=sum(x.ttft is False for x in e),
            ttft_misses_decode=sum(x.ttft_decode for x in e),
            tpot_requests=sum(x.tpot is not None for x in e),
            tpot_misses=sum(x.tpot is False for x in e),
            ttft_slo_ms_sum=round(sum(x.slo_ttft_ms for x in e)),
            tpot_slo_ms_sum=round(sum(x.slo_tpot_ms for x in e)),
            prompt_tokens=sum(x.prompt_tokens for x in e))

    def _expire(self) -> None:
        cutoff = self._clock() - self.window_s
        while self._ended and self._ended[0].time < cutoff:
            self._ended.popleft()
