"""The router queue: requests wait here until a worker of each role they need has a slot
(at most `max_in_flight_per_worker` of this router's requests each) and, for decode, the
prompt's blocks; then the routing policy picks the workers.

Life of a waiter: it takes a ticket in its line (disaggregated, or prefilled locally),
ordered by deadline (its arrival plus its TTFT SLO: earliest deadline first; arrival order
among equal ones and for requests without one), waits until it is at the head, then until
the policy finds workers; leaving, by success or not, it lets the next in line look at
once. `queued` and `queued_tokens` count the waiters and their prompt tokens (admission
reads them).

With a cost profile (`predictor`) the head's workers are chosen together, by predicted
cost (router.placement: the most SLO headroom over predicted TTFT, with both sides' prefix
caches and the KV bytes to send, and TPOT on the decode side); else by the policy's rules
for each side (router.policy).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from dataclasses import replace
from functools import partial

from pdserve.protocol import WorkerRole, block_hashes
from pdserve.router.errors import check_fits, overloaded, unavailable, worker_failed
from pdserve.router.incoming import IncomingBook
from pdserve.router.interference import InterferenceBook
from pdserve.router.ledger import PrefillLedger
from pdserve.router.placement import Slo, candidates, choose, side_of
from pdserve.router.policy import (
    Policy,
    WorkerLoad,
    choose_decode,
    choose_prefill,
    decode_fits,
    round_robin,
)
from pdserve.router.predict import Predictor
from pdserve.router.registry import prefix_hits
from pdserve.router.validate import ValidRequest
from pdserve.router.view import ClusterView, LiveWorker


class RouterQueue:
    def __init__(self, config, view: ClusterView, redis, ledger: PrefillLedger,
                 predictor: Predictor | None = None):
        """`config` is the router's RouterConfig (limits, policy, refresh period);
        `ledger` what this router sent each worker to prefill (router.ledger);
        `predictor` the cost profile's, None without one."""
        self.config, self.view, self.redis, self.ledger = config, view, redis, ledger
        self.predictor = predictor
        # the requests decoding on each worker, and the KVs on their way to each (the door
        # shares both): a local prefill's placement counts the TPOT and TTFT it leaves them
        self.interference = InterferenceBook()
        self.incoming = IncomingBook()
        self.queued = 0
        self.queued_tokens = 0
        self._tokens = {True: 0, False: 0}
        # the lines, disaggregated and local: tickets (deadline, arrival number), sorted
        self._lines: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
        self._notifies: set[asyncio.Task] = set()
        self._turn = itertools.count()
        self._arrivals = itertools.count()

    def queued_tokens_of(self, disagg: bool) -> int:
        """Prompt tokens waiting in one line."""
        return self._tokens[disagg]

    async def hits(self, tokens) -> dict[str, int]:
        """Per worker, the prompt's leading blocks its prefix cache holds ({} with no
        worker listed, or the registry unreadable)."""
        if not self.view.workers:
            return {}
        block_size = next(iter(self.view.workers.values())).record.block_size
        return await prefix_hits(self.redis, block_hashes(tokens, block_size))

    async def wait(self, req: ValidRequest, disagg: bool, avoid: set[str],
                   prefer_prefill: str | None = None, retry: bool = False,
                   deadline: float | None = None, hits: dict[str, int] | None = None,
                   slo: Slo | None = None) -> tuple[LiveWorker, LiveWorker | None]:
        """Until a decode (or colocated) worker has a slot and the
        prompt's blocks, and, when disaggregated, a prefill worker has a slot. Workers in
        `avoid` (they failed this request) are passed over while others are listed; the
        prefill worker `prefer_prefill` (it holds the prompt's KV) is the only one
        considered while it is listed.

        Earliest deadline first within each line (disaggregated, local), arrival order among
        equal deadlines: only the head of a line picks workers. Without it every waiter
        raced for each freed slot, and an unlucky one could wait without bound behind later
        arrivals. `deadline` (when its
        first token is due; None: none) orders the line. A `retry` (admitted before, failed
        by a worker) goes to the head of its line: it has waited its turn. `hits` and `slo`
        (router.placement) are what a placement by predicted cost needs; without them, or
        without a predictor, each side is picked by the policy."""
        if self.queued >= self.config.max_queue and not retry:
            raise overloaded(f"the router queue is full ({self.config.max_queue} requests "
                             "waiting for a worker)")
        n = len(req.prompt_token_ids)
        line = self._lines[disagg]
        ticket = (-math.inf if retry else math.inf if deadline is None else deadline,
                  next(self._arrivals))
        bisect.insort(line, ticket)
        self.queued += 1
        self.queued_tokens += n
        self._tokens[disagg] += n
        try:
            while True:
                if line[0] is not ticket:
                    await self.view.wait_for_change(self.config.refresh_s)
                    continue
                decode_roles = ((WorkerRole.DECODE,) if disagg
                                else (WorkerRole.COLOCATED, WorkerRole.DECODE))
                decodes = preferring(self.view.of_role(*decode_roles), avoid)
                if not decodes:
                    names = " or ".join(r.value for r in decode_roles)
                    raise unavailable(f"no live {names} worker")
                check_fits(decodes, len(req.prompt_token_ids))
                prefills = self._prefills(avoid, prefer_prefill) if disagg else []
                if self.predictor is not None and hits is not None and slo is not None:
                    if (picked := self._place(req, decodes, prefills, disagg, hits, slo)):
                        return picked
                else:
                    prefill = (await self._pick_prefill(prefills, req.prompt_token_ids)
                               if disagg else None)
                    decode = self._pick_decode(decodes, len(req.prompt_token_ids))
                    if decode is not None and (prefill is not None or not disagg):
                        return decode, prefill
                await self.view.wait_for_change(self.config.refresh_s)  # a slot, blocks
        finally:
            self.queued -= 1
            self.queued_tokens -= n
            self._tokens[disagg] -= n
            head = line[0] is ticket
            line.remove(ticket)
            if head and line:
                # the next in line looks now, not at a refresh; from a task, so it looks
                # after the caller took the slot just picked (no await before that)
                task = asyncio.get_running_loop().create_task(self.view.notify())
                self._notifies.add(task)
                task.add_done_callback(self._notifies.discard)

    def _prefills(self, avoid: set[str], prefer: str | None) -> list[LiveWorker]:
        """The prefill workers to pick from: `prefer` alone while it is listed, else those
        not in `avoid` (all, when none is left)."""
        prefills = preferring(self.view.of_role(WorkerRole.PREFILL), avoid)
        if not prefills:
            raise _no_prefill_worker()
        return [w for w in prefills if w.worker_id == prefer] or prefills

    def _place(self, req: ValidRequest, decodes: list[LiveWorker],
               prefills: list[LiveWorker], disagg: bool, hits: dict[str, int],
               slo: Slo) -> tuple[LiveWorker, LiveWorker | None] | None:
        """The placement with the most headroom among the workers with a free slot (and,
        for decode, the blocks), or None while there is none."""
        limit, n = self.config.max_in_flight_per_worker, len(req.prompt_token_ids)
        by_id = {w.worker_id: w for w in decodes + prefills}
        free = [w for w in decodes if decode_fits(w.load(), n, limit)]

        def sides(workers):
            return [side_of(w, self.ledger, hits) for w in workers]

        if disagg:
            options = candidates(self.predictor, n,
                                 sides(w for w in prefills if len(w.in_flight) < limit),
                                 sides(free), [])
        else:
            options = candidates(self.predictor, n, [], [], sides(free),
                                 others=self.interference.others_ratio,
                                 incoming=partial(self.incoming.others_ratio, self.predictor),
                                 unprotected=self.interference.unprotected)
        best = choose(options, slo)
        if best is None:
            return None
        return by_id[best.decode_id], by_id.get(best.prefill_id)

    def _pick_decode(self, workers: list[LiveWorker], n: int) -> LiveWorker | None:
        loads = {w.worker_id: w for w in workers}
        limit = self.config.max_in_flight_per_worker
        if self.config.policy is Policy.ROUND_ROBIN:
            chosen = round_robin([w.load() for w in workers], next(self._turn), limit)
        else:
            chosen = choose_decode([w.load() for w in workers], n, limit)
        return loads[chosen.worker_id] if chosen else None

    async def _pick_prefill(self, workers: list[LiveWorker], tokens) -> LiveWorker | None:
        loads = {w.worker_id: w for w in workers}
        limit = self.config.max_in_flight_per_worker
        if self.config.policy is Policy.ROUND_ROBIN:
            chosen = round_robin([w.load() for w in workers], next(self._turn), limit)
        else:
            block_size = workers[0].record.block_size
            hits = await prefix_hits(self.redis, block_hashes(tokens, block_size))
            chosen = choose_prefill([self._prefill_load(w) for w in workers], len(tokens),
                                    hits, limit)
        return loads[chosen.worker_id] if chosen else None


    def _prefill_load(self, w: LiveWorker) -> WorkerLoad:
        """Its load with the queue it reported, or what this router sent it since, if more
        (router.ledger): within a heartbeat, a burst spreads instead of piling onto the
        worker that last reported the shortest queue."""
        load = w.load()
        sent = self.ledger.tokens(w.worker_id)
        return replace(load, queued_prefill_tokens=sent) \
            if sent > load.queued_prefill_tokens else load


def _no_prefill_worker():
    """The prefill workers left (died, or switched role) while the request waited: a
    failure another dispatch recovers from, since it then prefills where it decodes."""
    return worker_failed("no live prefill worker")


def preferring(workers: list[LiveWorker], avoid: set[str]) -> list[LiveWorker]:
    """The workers not in `avoid`, or all of them when none is left."""
    return [w for w in workers if w.worker_id not in avoid] or workers
