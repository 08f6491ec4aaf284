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

Requests can also wait in the router queue for a slot (`max_in_flight_per_worker`), which
short prompts fill by decoding, not by prefill work. That wait is the requests queued
ahead over the rate at which slots came free while requests waited for them (`SlotRate`),
added to the prefill estimate.
"""

from __future__ import annotations

import time
from collections import deque
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
    best = min(first_token_wait_s(b, prompt_tokens) for b in backlogs)
    return best + router_queue_wait_s(router_queued_tokens,
                                      sum(b.tokens_per_s for b in backlogs))


def first_token_wait_s(backlog: Backlog, prompt_tokens: int) -> float:
    """The prompt's wait on one candidate: its queue and the prompt itself, at its rate."""
    return (backlog.queued_tokens + prompt_tokens) / backlog.tokens_per_s


def router_queue_wait_s(router_queued_tokens: int, total_tokens_per_s: float) -> float:
    """What the prompts waiting in the router queue add: their tokens over every
    candidate's rate together."""
    return router_queued_tokens / total_tokens_per_s


class SlotRate:
    """How fast this router's slots come free while requests wait for them: releases per
    second over the last `window_s`, counting only releases that found the queue
    non-empty (a quiet router's few releases say nothing of its capacity)."""

    def __init__(self, window_s: float = 10.0, min_samples: int = 4):
        self.window_s, self.min_samples = window_s, min_samples
        self._times: deque[float] = deque()

    def released(self, queue_waiting: bool, now: float | None = None) -> None:
        if queue_waiting:
            self._times.append(time.monotonic() if now is None else now)

    def per_s(self, now: float | None = None) -> float | None:
        """Releases per second, or None with too few to tell."""
        now = time.monotonic() if now is None else now
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        if len(self._times) < self.min_samples:
            return None
        return len(self._times) / max(now - self._times[0], 1e-3)


def slot_wait_s(queued_requests: int, releases_per_s: float | None) -> float:
    """Seconds until a slot frees for a request behind `queued_requests` others; 0.0 when
    none wait or the rate is unknown."""
    if queued_requests <= 0 or not releases_per_s:
        return 0.0
    return queued_requests / releases_per_s


def refusal(wait_s: float | None, budget_s: float | None) -> str | None:
    """Why the request is refused, or None to admit it. `budget_s` None or <= 0: no bound."""
    if wait_s is None or budget_s is None or budget_s <= 0 or wait_s <= budget_s:
        return None
    return (f"refused at admission: the work queued ahead of this prompt would delay its "
            f"first token ~{wait_s:.1f} s, beyond its TTFT SLO of {budget_s:.1f} s; retry later")
