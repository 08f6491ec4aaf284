"""The prompts this router has sent each worker whose first token has not come: what it
knows of a worker's prefill queue before the worker's next heartbeat says so.

A heartbeat is up to a period old when the router reads it, and a burst arrives within
one: with only the reported queues, admission would promise first tokens the queue cannot
keep, and every prefill choice in the burst would go to the worker that last reported the
shortest queue. Admission (router.door) and the prefill choice (router.queue) take the
larger of the reported queue and this one. A prompt stays here until its first token
comes, through the KV's transfer and the decode worker's admission, long after its own
steps ended; so predictions (router.predict) take from it what the worker will have
computed by now if it ran the prompts at the profile's pace from the moment each was sent.
Runs on the router's event loop only.
"""

from __future__ import annotations

import time


class PrefillLedger:
    def __init__(self) -> None:
        self._at: dict[str, tuple[str, int]] = {}  # tid -> (worker, prompt tokens)
        self._tokens: dict[str, int] = {}  # worker -> prompt tokens sent there
        # worker -> {tid: (monotonic time sent, prompt tokens)}, in the order sent
        self._sent: dict[str, dict[str, tuple[float, int]]] = {}

    def started(self, worker_id: str, tid: str, num_tokens: int) -> None:
        """`tid`'s prompt goes to the worker to prefill: from the moment its workers are
        picked, before the orders are answered (a burst's next placement comes meanwhile)."""
        self.ended(tid)
        self._at[tid] = (worker_id, num_tokens)
        self._tokens[worker_id] = self._tokens.get(worker_id, 0) + num_tokens
        self._sent.setdefault(worker_id, {})[tid] = (time.monotonic(), num_tokens)

    def ended(self, tid: str) -> None:
        """Its prefill is over (the first token came) or will not happen (idempotent)."""
        if (entry := self._at.pop(tid, None)) is not None:
            worker_id, n = entry
            left = self._tokens[worker_id] - n
            sent = self._sent[worker_id]
            del sent[tid]
            if left:
                self._tokens[worker_id] = left
            else:
                del self._tokens[worker_id]
                del self._sent[worker_id]

    def tokens(self, worker_id: str) -> int:
        return self._tokens.get(worker_id, 0)

    def sent(self, worker_id: str) -> tuple[tuple[float, int], ...]:
        """(seconds since it was sent, prompt tokens) of each prompt counted for the
        worker, the oldest first."""
        now = time.monotonic()
        return tuple((now - t, n) for t, n in self._sent.get(worker_id, {}).values())
