"""Admission's bound on time per output token, for prompts prefilled where others decode
(a colocated worker, or a decode worker's local prefill).

A prompt of n tokens prefilled on a worker stalls every request decoding there for about
n / (the worker's measured prefill rate) seconds. A request with a TPOT SLO T and
`max_tokens` m, on a worker whose decode-only steps take s now, meets its SLO while
s + (the stalls charged to it) / (m - 1) <= T. This book charges each local prefill's
stall to every request on its worker when the prefill is dispatched; a prompt does not
fit on a worker when its stall would push a request there that still meets its SLO past
it (one already past it, at today's step time, cannot be saved and holds nothing up).
Admission refuses the prompt at once (RESOURCE_EXHAUSTED) when it fits on no worker, and
the queue passes over the workers where it does not fit while others are listed. The
step time is the worker's current one, so a batch that grew leaves less room for stalls.
Requests without a TPOT SLO, and workers that have not measured their rates yet, have
nothing to protect; their prefills are charged to the others all the same.
Disaggregated prompts stall nothing here (their prefill runs elsewhere).

Stalls are charged at dispatch, to the requests then on the worker; a request's own TTFT
is admission's other bound (router.admission).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.protocol import WorkerRecord


def stall_s(record: WorkerRecord, prompt_tokens: int) -> float:
    """How long a prompt prefilled on the worker stalls its decodes; 0.0 while the worker
    has not measured its prefill rate."""
    rate = record.prefill_tokens_per_s
    return prompt_tokens / rate if rate > 0 else 0.0


@dataclass
class Decoding:
    """A request with a TPOT SLO on a worker, and the stalls charged to it so far."""

    tpot_s: float
    tokens: int  # max_tokens - 1: the gaps its TPOT averages over
    charged_s: float = 0.0

    def tpot_with(self, step_s: float, stall: float) -> float:
        return step_s + (self.charged_s + stall) / self.tokens

    def meets(self, step_s: float, stall: float = 0.0) -> bool:
        return self.tpot_with(step_s, stall) <= self.tpot_s + 1e-9  # at the SLO is within it


def decoding(tpot_slo_ms: float | None, max_tokens: int) -> Decoding | None:
    """What the book keeps of a request; None when it has no TPOT to protect."""
    if not tpot_slo_ms or max_tokens < 2:
        return None
    return Decoding(tpot_slo_ms / 1000, max_tokens - 1)


class InterferenceBook:
    """The requests with a TPOT SLO that this router has on each worker, and what was
    charged to each. Runs on the router's event loop only."""

    def __init__(self) -> None:
        self._on: dict[str, dict[str, Decoding]] = {}  # worker id -> transfer id -> request

    def fits(self, record: WorkerRecord, stall: float) -> bool:
        step = record.decode_step_s
        if stall <= 0 or step <= 0:
            return True
        return all(d.meets(step, stall) for d in self._on.get(record.worker_id, {}).values()
                   if d.meets(step))

    def worst_ratio(self, worker_id: str, step_s: float, stall: float) -> float:
        """The worst TPOT over its SLO, among the requests on the worker that still meet
        theirs, once `stall` is charged to them at a step time of `step_s`; 0.0 with none
        (those already past it cannot be saved, as in `fits`)."""
        return max((d.tpot_with(step_s, stall) / d.tpot_s
                    for d in self._on.get(worker_id, {}).values() if d.meets(step_s)),
                   default=0.0)

    def others_ratio(self, side, step_s: float, stall: float) -> float:
        """`worst_ratio` on a placement side's worker: router.placement's `others`."""
        return self.worst_ratio(side.record.worker_id, step_s, stall)

    def protected(self, worker_id: str) -> int:
        """Requests on the worker with a TPOT SLO."""
        return len(self._on.get(worker_id, {}))

    def unprotected(self, side) -> int:
        """Requests decoding on a placement side's worker without a TPOT SLO (of its batch,
        those this router protects aside): router.placement's `unprotected`."""
        return max(0, side.batch - self.protected(side.record.worker_id))

    def joined(self, worker_id: str, transfer_id: str, stall: float,
               request: Decoding | None) -> None:
        """`transfer_id` was dispatched to the worker; its prefill there (if local) stalls
        the requests already on it by `stall`. `request`: its own SLO, None for none."""
        on_worker = self._on.setdefault(worker_id, {})
        if stall > 0:
            for d in on_worker.values():
                d.charged_s += stall
        if request is not None:
            on_worker[transfer_id] = request

    def left(self, worker_id: str, transfer_id: str) -> None:
        """The request left the worker (idempotent)."""
        on_worker = self._on.get(worker_id)
        if on_worker is not None:
            on_worker.pop(transfer_id, None)
            if not on_worker:
                del self._on[worker_id]
