"""The prompts this router has sent each worker whose first token has not come: what it
knows of a worker's prefill queue before the worker's next heartbeat says so.

A heartbeat is up to a period old when the router reads it, and a burst arrives within
one: with only the reported queues, admission would promise first tokens the queue cannot
keep, and every prefill choice in the burst would go to the worker that last reported the
shortest queue. Admission (router.door) and the prefill choice (router.queue) take the
larger of the reported queue and this one, or, where the report tells the time of the
load it counts, the report plus what was sent since (`sent_since`). Runs on the router's
event loop only.
"""

from __future__ import annotations

import time


class PrefillLedger:
    def __init__(self) -> None:
        self._at: dict[str, tuple[str, int, float]] = {}  # tid -> (worker, tokens, sent at)
        self._tokens: dict[str, int] = {}  # worker -> prompt tokens sent there

    def started(self, worker_id: str, tid: str, num_tokens: int,
                at: float | None = None) -> None:
        """`tid`'s prompt was sent to the worker to prefill, at Unix time `at` (now)."""
        self.ended(tid)
        self._at[tid] = (worker_id, num_tokens, time.time() if at is None else at)
        self._tokens[worker_id] = self._tokens.get(worker_id, 0) + num_tokens

    def ended(self, tid: str) -> None:
        """Its prefill is over (the first token came) or will not happen (idempotent)."""
        if (entry := self._at.pop(tid, None)) is not None:
            worker_id, n, _ = entry
            left = self._tokens[worker_id] - n
            if left:
                self._tokens[worker_id] = left
            else:
                del self._tokens[worker_id]

    def tokens(self, worker_id: str) -> int:
        return self._tokens.get(worker_id, 0)

    def sent_since(self, worker_id: str, since: float) -> list[tuple[float, int]]:
        """(Unix time sent, prompt tokens) of the prompts sent to the worker at or after
        `since` whose first token has not come, oldest first."""
        return sorted((at, n) for w, n, at in self._at.values()
                      if w == worker_id and at >= since)
