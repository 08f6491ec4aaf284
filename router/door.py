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
"""

from __future__ import annotations

from pdserve.protocol import WorkerRole
from pdserve.router.admission import Backlog, SlotRate, estimate_wait_s, refusal, slot_wait_s
from pdserve.router.errors import check_fits, overloaded
from pdserve.router.interference import InterferenceBook, stall_s
from pdserve.router.ledger import PrefillLedger
from pdserve.router.queue import RouterQueue
from pdserve.router.validate import ValidRequest
from pdserve.router.view import ClusterView


class Door:
    def __init__(self, config, view: ClusterView, queue: RouterQueue, ledger: PrefillLedger):
        """`config`: the router's RouterConfig (the default TTFT SLO)."""
        self.config, self.view, self.queue, self.ledger = config, view, queue, ledger
        self.slots = SlotRate()
        self.interference = InterferenceBook()

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
