"""Where a request runs, chosen by predicted cost (router.predict), when the router has a
cost profile: prefilled on a prefill worker and decoded on a decode worker, or prefilled
where it decodes, and on which workers, all in one choice.

Every candidate placement gets a predicted TTFT and TPOT; its headroom is the smaller of
1 - TTFT / the TTFT SLO, 1 - TPOT / the TPOT SLO and, for a local prefill, 1 - the worst
TPOT over its SLO of the requests already decoding on that worker once the prefill's stall
is charged to them, and 1 - the worst TTFT over its SLO of the remote requests whose KV is
on its way there once the prefill's steps delay them (router.incoming) (a local prefill is
chosen only with room in those SLOs to spare; else the transfer is worth its cost) (the
request's own SLOs, the router's default TTFT SLO when it has none; an SLO that is not set
leaves its term out, and with neither the headroom is -TTFT in seconds, so the fastest
first token wins). A local prefill also delays the requests decoding on its worker that
set no TPOT SLO, which no term above protects: that delay, summed over them, counts as
first-token time of the placement (in the TTFT term, or the -TTFT), so with no SLOs the
choice keeps the total delay least instead of buying one request's first token with the
whole batch's time (a closed loop at capacity otherwise prefilled most prompts where they
decode, next to an idle prefill worker, at half of 1P1D's throughput). The choice is the
placement with the most headroom: one that meets both SLOs beats any that does not, and
among those that do, the one with the most slack; among those that do not, the one that
misses by least; among equals, the one that stalls the requests already decoding least,
then the earliest first token. A local placement must also fit the TPOT SLOs of the
requests already decoding on its worker (router.interference, with the predicted stall).

The candidates are bounded for large clusters: the `width` best prefill workers by
predicted prefill finish and the `width` best decode workers by batch, plus every worker
whose prefix cache holds part of the prompt, are paired.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pdserve.router.ledger import PrefillLedger
from pdserve.router.predict import Prediction, Predictor, Side
from pdserve.router.view import LiveWorker

WIDTH = 4


def side_of(w: LiveWorker, ledger: PrefillLedger, hits: dict[str, int]) -> Side:
    """A worker as predictions see it: its queue the larger of its report and what this
    router sent it since (router.ledger; with when each of those was sent, when it is the
    larger), its batch the larger of its report and this router's requests there, and the
    prompt's blocks its prefix cache holds (`hits`)."""
    r = w.record
    sent = ledger.tokens(r.worker_id)
    return Side(r, max(r.queued_prefill_tokens, sent),
                max(r.running + r.waiting, len(w.in_flight)),
                hits.get(r.worker_id, 0) * r.block_size,
                ledger.sent(r.worker_id) if sent >= r.queued_prefill_tokens else ())


@dataclass(frozen=True)
class Placement:
    decode_id: str
    prefill_id: str  # "" for a local prefill
    prediction: Prediction

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill_id)


@dataclass(frozen=True)
class Route:
    """What admission decided for a request, for each of its dispatches: its place in the
    queue's deadline order, the prompt's prefix hits and the SLOs placement judges by
    (None without a cost profile), disaggregated or not, the predicted TTFT and TPOT (0.0:
    none)."""

    deadline: float | None
    hits: dict[str, int] | None
    slo: Slo | None
    predicted_ttft_s: float
    disaggregated: bool
    predicted_tpot_s: float = 0.0


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None
    tpot_s: float | None

    def headroom(self, p: Prediction) -> float:
        first = p.ttft_s + p.others_delay_s
        terms = [1 - first / self.ttft_s] if self.ttft_s else []
        if self.tpot_s:
            terms.append(1 - p.tpot_s / self.tpot_s)
        for ratio in (p.others_tpot_ratio, p.others_ttft_ratio):
            if ratio:
                terms.append(1 - ratio)
        return min(terms) if terms else -first

    def met(self, p: Prediction) -> bool:
        """Whether the placement meets the request's and the protected requests' SLOs (the
        delay charged for unprotected decodes ranks placements; it is no SLO)."""
        own = replace(p, others_delay_s=0.0)
        return self.headroom(own) >= 0 if (self.ttft_s or self.tpot_s) else True


def candidates(predictor: Predictor, prompt: int, prefills: Sequence[Side],
               decodes: Sequence[Side], local: Sequence[Side], width: int = WIDTH,
               others: Callable[[Side, float, float], float] | None = None,
               incoming: Callable[[Side, int], float] | None = None,
               unprotected: Callable[[Side], int] | None = None) -> list[Placement]:
    """Every placement worth predicting: remote over the best (prefill, decode) pairs, and
    local on each of `local` (the workers where a local prefill fits). `others(side,
    step_s, stall_s)`: the worst TPOT over its SLO of the requests decoding on the side's
    worker once a local prefill's stall is charged (router.interference); `incoming(side,
    prompt)`: the worst TTFT over its SLO of the KVs on their way there, once the local
    prefill's steps delay them (router.incoming); `unprotected(side)`: how many requests
    decoding on the side's worker set no TPOT SLO (the delay a local prefill adds to them
    is charged to the placement)."""
    def best(sides: Sequence[Side], key: Callable[[Side], float]) -> list[Side]:
        top = heapq.nsmallest(width, sides, key=key)
        seen = {id(s) for s in top}
        return top + [s for s in sides if s.cached_tokens and id(s) not in seen]

    out = []
    for s in local:
        p = predictor.local(s, prompt)
        if others is not None:
            ratio = others(s, predictor.decode_step_s(s.batch, s.context), p.stall_s)
            p = replace(p, others_tpot_ratio=ratio)
        if incoming is not None:
            p = replace(p, others_ttft_ratio=incoming(s, prompt))
        if unprotected is not None:
            p = replace(p, others_delay_s=p.stall_s * unprotected(s))
        out.append(Placement(s.record.worker_id, "", p))
    if prefills and decodes:
        ps = best(prefills, lambda s: s.queued_tokens + prompt - s.cached_tokens)
        ds = best(decodes, lambda s: s.batch)
        out += [Placement(d.record.worker_id, p.record.worker_id,
                          predictor.remote(p, d, prompt)) for p in ps for d in ds]
    return out


def choose(placements: Sequence[Placement], slo: Slo) -> Placement | None:
    """The placement with the most headroom (see the module). Among equals, the one that
    stalls the requests already decoding least, then the earlier TTFT: when the same TPOT
    term binds a local and a remote placement on one decode worker, a local prefill would
    spend the batch's slack on a first token that had room to spare."""
    return max(placements, key=lambda c: (slo.headroom(c.prediction),
                                          -c.prediction.others_tpot_ratio,
                                          -c.prediction.ttft_s), default=None)
