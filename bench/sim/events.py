"""The simulator's clock: a heap of timed callbacks.

Events at the same time run in the order they were scheduled (a sequence number breaks
ties), so a run is deterministic. A callback may schedule more; `run` ends when none is
left. Cancelling is the owner's business: a stale event checks its own epoch and returns.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = itertools.count()
        self.processed = 0

    def at(self, t: float, fn: Callable, *args) -> None:
        """Run `fn(*args)` at time `t` (never before now)."""
        heapq.heappush(self._heap, (t if t > self.now else self.now, next(self._seq), fn,
                                    args))

    def after(self, dt: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (self.now + dt if dt > 0 else self.now, next(self._seq),
                                    fn, args))

    def run(self, until: float = float("inf")) -> None:
        heap = self._heap
        pop = heapq.heappop
        done = 0
        try:
            while heap and heap[0][0] <= until:
                t, _, fn, args = pop(heap)
                self.now = t
                fn(*args)
                done += 1
        finally:
            self.processed += done

    @property
    def pending(self) -> int:
        return len(self._heap)
