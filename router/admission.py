"""Admission at the door: a request is refused at once (RESOURCE_EXHAUSTED, with the
reason) when the prefill work already queued ahead of it would delay its first token past
its TTFT SLO, its own or the router's default; it is never accepted and failed late.

The estimate is a queue-token bound over the workers that could prefill the prompt (the
prefill workers when it is disaggregated, else the colocated and decode workers): on each,
(tokens queued there + the prompt's) / the prefill rate it measured on its own steps;
the best of them, plus the tokens waiting in this router's queue over their summed rate.
A worker's queue is the larger of what it last reported and what this router has sent it
since (the report may be half a heartbeat old, and a burst arrives within one). While a
candidate has not measured its rate yet, nothing is refused: capacity is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Backlog:
    """One candidate worker's queued prefill work, as admission sees it."""

    worker_id: str
    queued_tokens: int
    tokens_per_s: float  # measured prefill rate; <= 0: not measured yet


def estimate_wait_s(backlogs: Sequence[Backlog], prompt_tokens: int,
                    router_queued_tokens: int) -> float | None:
    """Seconds until the prompt's first token, from queued work alone; None when unknown
    (no candidate, or one without a measured rate)."""
    if not backlogs or any(b.tokens_per_s <= 0 for b in backlogs):
        return None
    best = min((b.queued_tokens + prompt_tokens) / b.tokens_per_s for b in backlogs)
    return best + router_queued_tokens / sum(b.tokens_per_s for b in backlogs)


def refusal(wait_s: float | None, budget_s: float | None) -> str | None:
    """Why the request is refused, or None to admit it. `budget_s` None or <= 0: no bound."""
    if wait_s is None or budget_s is None or budget_s <= 0 or wait_s <= budget_s:
        return None
    return (f"refused at admission: the prefill work queued ahead of this prompt would take "
            f"~{wait_s:.1f} s, beyond its TTFT SLO of {budget_s:.1f} s; retry later")
