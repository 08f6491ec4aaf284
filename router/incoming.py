"""The KVs on their way to each decode worker: the remote prompts this router dispatched
whose first token has not come, each with when its first token is predicted and when its
TTFT SLO ends.

A decode worker takes a KV in between two of its steps, so one that arrives while the
worker prefills a prompt of its own waits for that step to end (router.predict), seconds
on a CPU. Placement (router.placement) charges a local prefill, for each KV on its way to
that worker, the wait the prefill's steps add to it: a local prefill that would push one
of them past its TTFT SLO loses to a remote placement, as one that would push a decoding
request past its TPOT SLO does (router.interference).

Ownership: the router enters a request when its dispatch is remote (`expect`) and takes it
out when its first token comes or the dispatch ends (`arrived`, idempotent). Wall-clock
times (time.time()), as the route's deadline. Runs on the router's event loop only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.router.predict import Predictor, Side


@dataclass(frozen=True)
class Incoming:
    since: float  # the request's arrival
    first_token_at: float  # predicted at admission
    deadline: float  # its TTFT SLO's end


class IncomingBook:
    def __init__(self) -> None:
        self._to: dict[str, dict[str, Incoming]] = {}  # worker id -> transfer id -> KV

    def expect(self, worker_id: str, transfer_id: str, since: float, first_token_at: float,
               deadline: float) -> None:
        self._to.setdefault(worker_id, {})[transfer_id] = Incoming(since, first_token_at,
                                                                   deadline)

    def arrived(self, worker_id: str, transfer_id: str) -> None:
        """Its first token came, or its dispatch ended (idempotent)."""
        on_way = self._to.get(worker_id)
        if on_way is not None:
            on_way.pop(transfer_id, None)
            if not on_way:
                del self._to[worker_id]

    def __len__(self) -> int:
        """KVs on their way, on every worker."""
        return sum(len(on_way) for on_way in self._to.values())

    def worst_ratio(self, worker_id: str, delay: Callable[[float], float],
                    now: float | None = None) -> float:
        """The worst TTFT over its SLO among the KVs on their way to the worker once each
        is delayed by `delay(seconds from now until its first token was due)`; 0.0 with
        none. One already due, or predicted past its SLO, cannot be saved and is left
        out (as in router.interference)."""
        now = time.time() if now is None else now
        worst = 0.0
        for k in self._to.get(worker_id, {}).values():
            due = k.first_token_at - now
            if due < 0 or k.first_token_at > k.deadline or k.deadline <= k.since:
                continue
            late = k.first_token_at + delay(due)
            worst = max(worst, (late - k.since) / (k.deadline - k.since))
        return worst

    def others_ratio(self, predictor: Predictor, side: Side, prompt: int) -> float:
        """`worst_ratio` on a placement side's worker for a local prefill of `prompt`
        tokens placed there now: each KV waits for the step in progress when it arrives,
        with the prompt in the worker's queue, instead of without it."""
        if side.record.worker_id not in self._to:
            return 0.0
        queued, ran = predictor.queued(side, side.batch, side.context)

        def delay(at_s: float) -> float:
            def wait(tokens: int) -> float:
                return predictor.step_end_s(tokens, side.chunk, side.batch, side.context,
                                            at_s + ran)
            return max(wait(queued + prompt) - wait(queued), 0.0)

        return self.worst_ratio(side.record.worker_id, delay)
