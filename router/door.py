"""Admission at the router's door: what the router knows of the work it has sent, and the
verdict on each new request, given at once.

A request is refused (RESOURCE_EXHAUSTED, with the reason) when the prefill work queued
ahead of it would delay its first token past its TTFT SLO, its own or the router's
default (router.admission), or when, prefilled where it would decode, it would stall the
requests decoding there past their TPOT SLO on every worker (router.interference). What
is admitted is never failed for waiting.

The router reports to the door as requests move: the ledger (router.ledger: the prompts it
sent each worker whose first token has not come, since a load report lags a heartbeat and
a burst arrives within one), `slots.released` (router.admission, SlotRate) and
`interference.joined` / `left`. Runs on the router's event loop only.

With a cost profile (`predictor`), `place` replaces both the threshold and the queue-token
bound: the request's placement (remote or local, and where) is the one with the most SLO
headroom by predicted TTFT and TPOT (router.placement), and the request is refused at once
when even that one's predicted first token, plus the wait for a slot, is past its TTFT SLO;
and when its predicted TPOT there (the decode batch it would join) is past its TPOT SLO;
the refusal names the prediction. A request with nothing ahead of it (no prompt queued
and no sequence decoding on its workers, none waiting in the router) is admitted whatever
is predicted: refusing it frees nothing for anyone, and its outcome corrects the
predictions (router.calibration) that a stale profile would otherwise keep refusing by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial

from pdserve.protocol import WorkerRole
from pdserve.router.admission import Backlog, SlotRate, estimate_wait_s, refusal, slot_wait_s
from pdserve.router.errors import check_fits, overloaded
from pdserve.router.interference import stall_s
from pdserve.router.ledger import PrefillLedger
from pdserve.router.observe import Shortage
from pdserve.router.placement import Placement, Route, Slo, candidates, choose, side_of
from pdserve.router.policy import Hint, should_disaggregate
from pdserve.router.predict import Predictor, Side
from pdserve.router.queue import RouterQueue
from pdserve.router.validate import ValidRequest
from pdserve.router.view import ClusterView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placed:
    """A request `place` admitted: where it goes, the workers where its local prefill
    would stall others past their SLO (the queue passes over them), and the prediction."""

    placement: Placement
    unfit: set[str]
    ttft_s: float  # predicted, the wait for a slot included

    @property
    def disaggregated(self) -> bool:
        return self.placement.disaggregated


class Door:
    def __init__(self, config, view: ClusterView, queue: RouterQueue, ledger: PrefillLedger,
                 predictor: Predictor | None = None):
        """`config`: the router's RouterConfig (the default TTFT SLO). `predictor`: from
        the cost profile, None without one. The interference and incoming books are the
        queue's (both judge a local prefill by them)."""
        self.config, self.view, self.queue, self.ledger = config, view, queue, ledger
        self.predictor = predictor
        self.slots = SlotRate()
        self.interference = queue.interference
        self.incoming = queue.incoming

    async def route(self, req: ValidRequest, arrival: float,
                    request_id: str = "") -> tuple[Route, set[str]]:
        """Admit the request (or raise, as `admit` and `place` do) and decide its route:
        by `place` with a cost profile, else by the hint and the threshold and `admit`.
        Returns the route and the workers its local prefill would stall past their SLO."""
        slo = self.slo(req)
        deadline = arrival + slo.ttft_s if slo.ttft_s else None
        if self.predictor is None:
            disagg = self.disaggregates(req)
            return Route(deadline, None, None, 0.0, disagg), self.admit(req, disagg)
        hits = await self.queue.hits(req.prompt_token_ids)
        placed = self.place(req, hits, request_id)
        return (Route(deadline, hits, slo, placed.ttft_s, placed.disaggregated,
                      placed.placement.prediction.tpot_s), placed.unfit)

    def disaggregates(self, req: ValidRequest, avoid: set[str] = frozenset(),
                      decided: bool | None = None) -> bool:
        """As admission `decided`, or by the hint and the threshold, if a prefill worker
        is listed that did not fail this request already (else the decode worker
        prefills it)."""
        prefills = [w for w in self.view.of_role(WorkerRole.PREFILL)
                    if w.worker_id not in avoid]
        if decided is not None:
            return decided and bool(prefills)
        return should_disaggregate(req.hint, len(req.prompt_token_ids),
                                   self.config.disaggregation_threshold, bool(prefills))

    def slo(self, req: ValidRequest) -> Slo:
        """The SLOs a placement is judged by: the request's own, else the default TTFT."""
        return Slo(req.slo_ttft_ms / 1000 if req.slo_ttft_ms else
                   self.config.default_ttft_slo_s or None,
                   req.slo_tpot_ms / 1000 if req.slo_tpot_ms else None)

    def stall_s(self, worker, num_tokens: int) -> float:
        """How long prefilling `num_tokens` on `worker` stalls the requests decoding there."""
        if self.predictor is None:
            return stall_s(worker.record, num_tokens)
        return self.predictor.local(side_of(worker, self.ledger, {}), num_tokens).stall_s

    def place(self, req: ValidRequest, hits: dict[str, int], request_id: str = "") -> Placed:
        """Where the request runs, by predicted cost (needs a predictor; `hits`: the
        prompt's leading blocks each worker's prefix cache holds). Raises
        RESOURCE_EXHAUSTED to refuse it now, INVALID_ARGUMENT for a prompt no worker could
        hold."""
        n = len(req.prompt_token_ids)
        holders = self.view.of_role(WorkerRole.COLOCATED, WorkerRole.DECODE)
        if holders:
            check_fits(holders, n)
        decodes = self.view.of_role(WorkerRole.DECODE)
        prefills = self.view.of_role(WorkerRole.PREFILL) if decodes else []
        if req.hint is Hint.NEVER or not prefills:
            prefills = []
        if req.hint is Hint.ALWAYS and prefills:
            holders = []
        fit = [w for w in decodes if -(-(n + 1) // w.record.block_size) <= w.record.total_blocks]

        def sides(workers, queued):
            # the prompts waiting in this router's queue will go ahead of this one: their
            # tokens spread over the workers that may prefill them
            share = queued // len(workers) if workers else 0
            out = {}
            for w in workers:
                s = side_of(w, self.ledger, hits)
                out[w.worker_id] = replace(s, queued_tokens=s.queued_tokens + share)
            return out

        local = sides(holders, self.queue.queued_tokens_of(False))
        remote = sides(prefills, self.queue.queued_tokens_of(True))
        decode = sides(fit, 0)
        unfit = {wid for wid, s in local.items() if not self.interference.fits(
            s.record, self.predictor.local(s, n).stall_s)}
        options = candidates(self.predictor, n, list(remote.values()), list(decode.values()),
                             [s for wid, s in local.items() if wid not in unfit],
                             others=self.interference.others_ratio,
                             incoming=partial(self.incoming.others_ratio, self.predictor),
                             unprotected=self.interference.unprotected)
        best = choose(options, slo := self.slo(req))
        if best is None:
            raise overloaded(
                f"refused at admission: prefilling this prompt ({n} tokens) where it would "
                f"decode would stall the requests decoding there past their TPOT SLO on "
                "every worker; retry later")
        wait = best.prediction.ttft_s + slot_wait_s(self.queue.queued, self.slots.per_s())
        where = (f"prefilled on {best.prefill_id}, decoded on {best.decode_id}"
                 if best.prefill_id else f"on {best.decode_id}")
        used = ([remote[best.prefill_id], decode[best.decode_id]] if best.prefill_id
                else [local[best.decode_id]])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s (%d tokens) placed %s: TTFT %.0f ms (slot wait included), "
                      "TPOT %.0f ms; %s", request_id or "-", n, where, wait * 1e3,
                      best.prediction.tpot_s * 1e3, "; ".join(self._seen(s) for s in used))
        if not self.queue.queued and not any(s.queued_tokens or s.batch for s in used):
            return Placed(best, unfit, wait)  # idle: see the module
        if slo.ttft_s and wait > slo.ttft_s:
            raise overloaded(
                f"refused at admission: predicted time to first token {wait:.2f} s at best "
                f"({where}) is beyond its TTFT SLO of {slo.ttft_s:.2f} s; retry later")
        if slo.tpot_s and best.prediction.tpot_s > slo.tpot_s:
            # mostly what the worker's own prompt chunks add: it lacks prefill workers
            stall = used[-1].record.prefill_stall_s
            short = Shortage.PREFILL if 2 * stall > best.prediction.tpot_s else Shortage.DECODE
            raise overloaded(
                f"refused at admission: predicted time per output token "
                f"{best.prediction.tpot_s * 1e3:.0f} ms at best ({where}) is beyond its TPOT "
                f"SLO of {slo.tpot_s * 1e3:.0f} ms; retry later", short)
        return Placed(best, unfit, wait)

    def _seen(self, s: Side) -> str:
        """What a placement saw of one worker (the debug log's)."""
        r = s.record
        return (f"{r.worker_id}: {s.queued_tokens} tokens queued (report {r.queued_prefill_tokens}"
                f", sent by this router {self.ledger.tokens(r.worker_id)}), batch {s.batch}, "
                f"context {s.context}, cached {s.cached_tokens}, TTFT scale "
                f"{self.predictor.calibration.ttft_scale(r.worker_id, False):.2f} remote / "
                f"{self.predictor.calibration.ttft_scale(r.worker_id, True):.2f} local, "
                f"decode scale {self.predictor.decode_scale(s):.2f}")

    def admit(self, req: ValidRequest, disagg: bool) -> set[str]:
        """Raise RESOURCE_EXHAUSTED to refuse the request now (see the module), or
        INVALID_ARGUMENT for a prompt no worker could ever hold. Returns the workers where
        its local prefill's stall does not fit (the queue passes over them)."""
        n = len(req.prompt_token_ids)
        holders = self.view.of_role(*((WorkerRole.DECODE,) if disagg else
                                      (WorkerRole.COLOCATED, WorkerRole.DECODE)))
        if holders:  # a prompt that can never fit is a bad request, not an overload
            check_fits(holders, n)
        budget = (req.slo_ttft_ms / 1000 if req.slo_ttft_ms else
                  self.config.default_ttft_slo_s)
        prefillers = self.view.of_role(WorkerRole.PREFILL) if disagg else holders
        backlogs = [Backlog(w.worker_id,
                            max(w.record.queued_prefill_tokens,
                                self.ledger.tokens(w.worker_id)),
                            w.record.prefill_tokens_per_s)
                    for w in prefillers]
        wait = estimate_wait_s(backlogs, n, self.queue.queued_tokens)
        if wait is not None:
            wait += slot_wait_s(self.queue.queued, self.slots.per_s())
        if (why := refusal(wait, budget)) is not None:
            raise overloaded(why)
        if disagg:
            return set()
        unfit = {w.worker_id for w in holders
                 if not self.interference.fits(w.record, stall_s(w.record, n))}
        if holders and len(unfit) == len(holders):
            protected = sum(self.interference.protected(w) for w in unfit)
            raise overloaded(
                f"refused at admission: prefilling this prompt ({n} tokens) where it would "
                f"decode would stall {protected} decoding requests past their TPOT SLO on "
                "every worker; retry later")
        return unfit
