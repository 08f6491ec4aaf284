"""The router's worker choice (router.policy) on large simulated clusters: the same order
and the same test, kept in a heap instead of evaluated over every worker per request.

`DecodePicker.pick(n)` returns exactly what `choose_decode(loads, n, max_in_flight)` would
over the workers' current loads, and `PrefillPicker.pick()` what `choose_prefill(loads, n,
{}, max_in_flight)` would (no prefix cache: the prompt's length adds the same to every
worker's rank, so the order does not depend on it). Each worker's entry is re-ranked by
`update` whenever its load changes; entries of older loads are skipped when they surface.
A worker without a free slot (`in_flight >= max_in_flight`) has no entry at all, so a
saturated cluster answers None at once instead of scanning.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from pdserve.router.policy import WorkerLoad, decode_fits, decode_rank, prefill_rank

_ABSENT = object()


class _Index:
    def __init__(self, workers: Iterable, max_in_flight: int,
                 rank: Callable[[WorkerLoad], tuple]):
        self.max_in_flight = max_in_flight
        self._rank = rank
        self._heap: list[tuple[tuple, int, object]] = []
        self._version: dict[str, int] = {}
        # the load each worker was last ranked by (None: not yet); its keys are the members
        self._seen: dict[str, WorkerLoad | None] = {}
        members = list(workers)
        for w in members:
            self._seen[w.worker_id] = None
            self._version[w.worker_id] = 0
        self._compact_at = 4 * len(self._seen) + 64  # heap entries, most of them stale
        for w in members:
            self.update(w)

    def update(self, worker, load: WorkerLoad | None = None) -> None:
        """The worker's load changed: rank it anew. `load`: its `load()`, when the caller
        has it. A worker whose `load()` returns the object it returned last time (SimWorker
        keeps it while its figures stand) costs a lookup."""
        wid = worker.worker_id
        seen_of = self._seen
        seen = seen_of.get(wid, _ABSENT)
        if seen is _ABSENT:
            return  # not one of this index's workers
        if load is None:
            load = worker.load()
        if load is seen:
            return  # the same load: its entry stands (an equal new one is ranked again,
            # to the same place)
        seen_of[wid] = load
        version = self._version[wid] + 1
        self._version[wid] = version
        if load.in_flight < self.max_in_flight:
            heap = self._heap
            heapq.heappush(heap, (self._rank(load), version, worker))
            if len(heap) > self._compact_at:
                self._compact()

    def first(self, fits: Callable[..., bool] | None, *args):
        """The first worker in rank order (with a free slot) whose load `fits(load, *args)`
        (None: any)."""
        heap, version, seen, pop = self._heap, self._version, self._seen, heapq.heappop
        while heap:  # the usual: the top entry is current and fits
            entry = heap[0]
            wid = entry[2].worker_id
            if entry[1] != version[wid]:
                pop(heap)
                continue
            if fits is None or fits(seen[wid], *args):  # the load it was ranked by: current
                return entry[2]
            break
        skipped, chosen = [], None
        while heap:
            entry = heap[0]
            wid = entry[2].worker_id
            if entry[1] != version[wid]:
                pop(heap)
                continue
            if fits(seen[wid], *args):
                chosen = entry[2]
                break
            skipped.append(pop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[1] == self._version[e[2].worker_id]]
        heapq.heapify(self._heap)


class DecodePicker(_Index):
    def __init__(self, workers: Iterable, max_in_flight: int):
        super().__init__(workers, max_in_flight, decode_rank)

    def pick(self, num_prompt_tokens: int):
        return self.first(decode_fits, num_prompt_tokens, self.max_in_flight)


class PrefillPicker(_Index):
    def __init__(self, workers: Iterable, max_in_flight: int):
        super().__init__(workers, max_in_flight, lambda load: prefill_rank(load, 1, {}))

    def pick(self):
        return self.first(None)
