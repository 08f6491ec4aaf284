"""Admission's bound on time per output token, for prompts prefilled where others decode
(a colocated worker, or a decode worker's local prefill).

A prompt of n tokens prefilled on a worker stalls every request decoding there for about
n / (the worker's measured prefill rate) seconds. A request with a TPOT SLO can absorb a
total stall of (TPOT SLO - the worker's decode-only step time) x (max_tokens - 1) over
its output and still meet it: its slack. This book charges each local prefill's stall to
the slack of every request on its worker when the prefill is dispatched; a prompt whose
stall exceeds what is left of any of them does not fit there. Admission refuses it at
once (RESOURCE_EXHAUSTED) when it fits on no worker, and the queue passes over the
workers where it does not fit while others are listed. Requests without a TPOT SLO, or on
a worker that has not measured its rates yet, have no slack to protect; their prefills
are charged to the others all the same. Disaggregated prompts stall nothing here (their
prefill runs elsewhere).

Stalls are charged at dispatch, to the requests then on the worker; a request's own TTFT
is admission's other bound (router.admission).
"""

from __future__ import annotations

from pdserve.protocol import WorkerRecord


def stall_s(record: WorkerRecord, prompt_tokens: int) -> float:
    """How long a prompt prefilled on the worker stalls its decodes; 0.0 while the worker
    has not measured its prefill rate."""
    rate = record.prefill_tokens_per_s
    return prompt_tokens / rate if rate > 0 else 0.0


def slack_s(record: WorkerRecord, tpot_slo_ms: float | None, max_tokens: int) -> float | None:
    """The stall a request decoding on the worker can absorb within its TPOT SLO; None
    when there is nothing to protect (no TPOT SLO, no measured step time)."""
    step = record.decode_step_s
    if not tpot_slo_ms or step <= 0:
        return None
    return max(0.0, tpot_slo_ms / 1000 - step) * max(0, max_tokens - 1)


class InterferenceBook:
    """What is left of the slack of each request decoding on each worker (this router's
    own requests). Runs on the router's event loop only."""

    def __init__(self) -> None:
        self._left: dict[str, dict[str, float]] = {}  # worker id -> transfer id -> seconds

    def fits(self, worker_id: str, stall: float) -> bool:
        return all(left >= stall for left in self._left.get(worker_id, {}).values())

    def protected(self, worker_id: str) -> int:
        """Requests on the worker with a slack to protect."""
        return len(self._left.get(worker_id, {}))

    def joined(self, worker_id: str, transfer_id: str, stall: float,
               slack: float | None) -> None:
        """`transfer_id` was dispatched to the worker; its prefill there (if local) stalls
        the requests already on it by `stall`. `slack`: its own, None for none."""
        on_worker = self._left.setdefault(worker_id, {})
        if stall > 0:
            for tid in on_worker:
                on_worker[tid] -= stall
        if slack is not None:
            on_worker[transfer_id] = slack

    def left(self, worker_id: str, transfer_id: str) -> None:
        """The request left the worker (idempotent)."""
        on_worker = self._left.get(worker_id)
        if on_worker is not None:
            on_worker.pop(transfer_id, None)
            if not on_worker:
                del self._left[worker_id]
