"""The simulated router: pdserve's admission, queue and routing (router.admission,
router.policy, router.interference), called on simulated workers.

What it keeps of the real router (router/router.py, door.py, queue.py): a request is
intook `router_s` after it arrives; disaggregated when `should_disaggregate` says so;
refused at once when the router queue is full or `estimate_wait_s` (plus `slot_wait_s`,
from a `SlotRate` of the slots freed while requests waited) puts its first token past its
TTFT SLO (`refusal`); with TPOT SLOs sent, a local prefill is passed over the workers
whose decodes it would stall past theirs (`stall_s`, `InterferenceBook`), and refused
when that is every worker. Admitted requests wait in two lines (disaggregated, local),
earliest deadline first as router.queue orders them (arrival plus the TTFT SLO; arrival
order among equal ones); the head of a line takes the workers `choose_decode` /
`choose_prefill` pick (bench.sim.picker: the same choice, indexed), when a decode worker
has a slot and the prompt's blocks and, disaggregated, a prefill worker has a slot. A
disaggregated request reserves its blocks on the decode worker and gives its prefill slot
back at the hand-off (its first token); the decode slot at its end.

With a cost profile in the RouterConfig, admission and the choice of workers are the real
door's and queue's by predicted cost instead (bench.sim.costed). Workers that change role
(bench.sim.switch) leave the router's choices while they drain and join those of their new
role once switched; remote requests left without a prefill worker go to the head of the
local line, as the real router dispatches them again. `observers` hear of every request
that ends (the controller's signal window, bench.sim.controller).

Loads are what the workers last published (every heartbeat_s, as heartbeats do), plus the
router's own counts: its requests on each worker (in_flight) and the prompt tokens it sent
each whose first token has not come (router.ledger's rule). What differs, on purpose: the
registry's own refresh period is not added to the heartbeat's, an order reaches a worker
at once (the call's latency is in `router_s`), nothing fails, there is one router, and the
KVs on their way to a decode worker are not booked (router.incoming: a local prefill is
not charged the wait it adds to them). On clusters of more than `EXACT_UP_TO` candidates,
admission's wait estimate takes the worker the prefill choice would take, the exact answer
when the candidates' rates are equal.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable

from pdserve.bench.metrics import Slo
from pdserve.bench.sim.costed import NO_PREFILL, Ask, CostPlacement
from pdserve.bench.sim.events import EventLoop
from pdserve.bench.sim.picker import DecodePicker, PrefillPicker
from pdserve.bench.sim.request import SimRequest, State
from pdserve.bench.sim.worker import SimWorker
from pdserve.protocol import WorkerRole
from pdserve.protocol.cost_profile import CostProfile
from pdserve.router.admission import (
    Backlog,
    SlotRate,
    estimate_wait_s,
    first_token_wait_s,
    refusal,
    router_queue_wait_s,
    slot_wait_s,
)
from pdserve.router.config import RouterConfig
from pdserve.router.interference import InterferenceBook, decoding, stall_s
from pdserve.router.policy import Hint, decode_fits, should_disaggregate

EXACT_UP_TO = 32


class _Record:
    """What router.interference reads of a worker's heartbeat."""

    __slots__ = ("worker_id", "prefill_tokens_per_s", "decode_step_s")

    def __init__(self, w: SimWorker):
        self.worker_id = w.worker_id
        self.prefill_tokens_per_s = w.heartbeat.rate
        self.decode_step_s = w.heartbeat.step_s


class SimRouter:
    def __init__(self, loop: EventLoop, config: RouterConfig, workers: list[SimWorker],
                 profile: CostProfile, sent_slo: Slo | None = None):
        self.loop, self.config, self.profile = loop, config, profile
        self.sent_slo = sent_slo
        self.workers = workers
        # the lines, disaggregated and local: (deadline, ticket, request), sorted
        self._lines: dict[bool, list[tuple[float, int, SimRequest]]] = {True: [], False: []}
        self._tickets = itertools.count()
        self._line_tokens = {True: 0, False: 0}
        self.queued = 0
        self.queued_tokens = 0
        self.open = 0  # requests arrived or to arrive that have not ended
        self.costed = (CostPlacement(config, workers, loop, self)
                       if config.cost_profile is not None else None)
        # the door's own, when it decides
        self.slots = self.costed.slots if self.costed else SlotRate()
        self.book = self.costed.book if self.costed else InterferenceBook()
        self._asks: dict[int, tuple[Ask, object]] = {}  # (costed) queued: its ask and SLO
        self._unfit: dict[int, set[str]] = {}
        self._kicking = False
        self._per_layer = 1.0 / profile.num_layers
        self.observers: list[Callable[[SimRequest], None]] = []
        for w in workers:
            w.on_prefilled = self._prefilled
            w.on_first_token = self._first_token
            w.on_finished = self._finished
            w.on_change = self._changed
            w.on_switched = self._switched
        self._take_roles()

    def _take_roles(self) -> None:
        """The workers of each role that take orders, and the indexes over them."""
        serving = [w for w in self.workers if w.serving]
        self.prefills = [w for w in serving if w.role is WorkerRole.PREFILL]
        self.decodes = [w for w in serving if w.role is WorkerRole.DECODE]
        self.holders = [w for w in serving if w.role is not WorkerRole.PREFILL]
        limit = self.config.max_in_flight_per_worker
        self._disagg_pick = DecodePicker(self.decodes, limit)
        self._prefill_pick = PrefillPicker(self.prefills, limit)
        for w in self.workers:  # a colocated worker joins the local indexes when they are made
            w.indexes = ([] if not w.serving or w.role is WorkerRole.COLOCATED
                         else [self._prefill_pick] if w.role is WorkerRole.PREFILL
                         else [self._disagg_pick])
            w.ranked = w.load()
        # for prompts prefilled where they decode; made at the first such prompt (a
        # deployment that disaggregates everything never pays for keeping them)
        self._local: tuple[DecodePicker, PrefillPicker] | None = None
        # the prefill rates the workers published, summed over the prefill workers (False)
        # and the local ones (True), with how many have published none yet
        self._rates = {False: [len(self.prefills), 0.0], True: [len(self.holders), 0.0]}
        for w in self.workers:
            w.summed_rate = 0.0
        for w in serving:
            self._sum_rate(w)

    def _switched(self, w: SimWorker, old: WorkerRole) -> None:
        """`w` began to drain, called its drain off, or took its new role."""
        self._take_roles()
        if not self.prefills and self._lines[True]:
            # the real queue fails a remote request with no prefill worker, and the router
            # dispatches it again locally, at the head of that line (a retry)
            moved, self._lines[True] = self._lines[True], []
            for _, _, r in moved:
                self._line_tokens[True] -= r.prompt_len
                self._line_tokens[False] += r.prompt_len
                r.disagg = False
                bisect.insort(self._lines[False], (-math.inf, next(self._tickets), r))
        self._kick()

    # -- intake and admission ---------------------------------------------------------------

    def arrive_all(self, requests: list[SimRequest]) -> None:
        """Take the requests in arrival order: each arrival schedules the next, so the
        clock holds one pending arrival, not all of them."""
        ordered = sorted(requests, key=lambda r: (r.arrival, r.idx))
        self.open += len(ordered)
        if ordered:
            self.loop.at(ordered[0].arrival + self.profile.router_s, self._next_arrival,
                         ordered, 0)

    def _next_arrival(self, ordered: list[SimRequest], i: int) -> None:
        if i + 1 < len(ordered):
            self.loop.at(ordered[i + 1].arrival + self.profile.router_s, self._next_arrival,
                         ordered, i + 1)
        self._intake(ordered[i])

    def _intake(self, r: SimRequest) -> None:
        now = self.loop.now
        r.t_intake = now
        if self.costed is not None:
            return self._intake_costed(r)
        n = r.prompt_len
        r.disagg = should_disaggregate(Hint.AUTO, n, self.config.disaggregation_threshold,
                                       bool(self.prefills))
        holders = self.decodes if r.disagg else self.holders
        # the workers of a deployment are alike: one that cannot hold it, none can
        if not holders or holders[0].blocks_for(n + 1) > holders[0].num_blocks:
            return self._end(r, State.FAILED, "the prompt fits on no worker")
        if self.queued >= self.config.max_queue:
            return self._end(r, State.REFUSED, "the router queue is full")
        budget = (self.sent_slo.ttft_ms / 1000 if self.sent_slo
                  else self.config.default_ttft_slo_s)
        wait = self._wait_s(self.prefills if r.disagg else holders, n)
        if wait is not None:
            wait += slot_wait_s(self.queued, self.slots.per_s(now))
        if (why := refusal(wait, budget)) is not None:
            return self._end(r, State.REFUSED, why)
        if not r.disagg and self.sent_slo is not None:
            unfit = {w.worker_id for w in holders
                     if not self.book.fits(_Record(w), stall_s(_Record(w), n))}
            if len(unfit) == len(holders):
                return self._end(r, State.REFUSED, "its prefill would stall every worker")
            self._unfit[r.idx] = unfit
        self._enqueue(r, now + budget if budget else math.inf)

    def _intake_costed(self, r: SimRequest) -> None:
        """Admission and the choice of remote or local by predicted cost (router.door's
        `route`: Door.place, then the queue's bound)."""
        slo = self.sent_slo
        ask = Ask(range(r.prompt_len), Hint.AUTO, slo.ttft_ms if slo else None,
                  slo.tpot_ms if slo else None)
        placed, error = self.costed.place(ask)
        if placed is None:
            r.short_of = error.short_of
            return self._end(r, State.FAILED if error.code == "INVALID_ARGUMENT"
                             else State.REFUSED, str(error))
        if self.queued >= self.config.max_queue:
            return self._end(r, State.REFUSED, "the router queue is full")
        judged = self.costed.slo(ask)
        r.disagg = placed.disaggregated and bool(self.prefills)
        if placed.unfit:
            self._unfit[r.idx] = set(placed.unfit)
        self._asks[r.idx] = (ask, judged)
        self._enqueue(r, self.loop.now + judged.ttft_s if judged.ttft_s else math.inf)

    def _enqueue(self, r: SimRequest, deadline: float) -> None:
        """Into its line by deadline (router.queue's ticket), then let the heads look."""
        r.state = State.QUEUED
        bisect.insort(self._lines[r.disagg], (deadline, next(self._tickets), r))
        self.queued += 1
        self.queued_tokens += r.prompt_len
        self._line_tokens[r.disagg] += r.prompt_len
        self._kick()

    def tokens_of(self, disagg: bool) -> int:
        """Prompt tokens waiting in one line (the door's `queued_tokens_of`)."""
        return self._line_tokens[disagg]

    def _wait_s(self, candidates: list[SimWorker], n: int) -> float | None:
        if len(candidates) <= EXACT_UP_TO:
            return estimate_wait_s([self._backlog(w) for w in candidates], n,
                                   self.queued_tokens)
        local = candidates is not self.prefills
        unmeasured, total_rate = self._rates[local]
        if unmeasured:
            return None
        index = self._local_index()[1] if local else self._prefill_pick
        best = index.pick() or candidates[0]
        return (first_token_wait_s(self._backlog(best), n)
                + router_queue_wait_s(self.queued_tokens, total_rate))

    def _backlog(self, w: SimWorker) -> Backlog:
        """As router.door sees a worker: the larger of its last reported queue and the
        prompts this router sent it whose first token has not come."""
        return Backlog(w.worker_id, max(w.heartbeat.record[3], w.sent_tokens), w.heartbeat.rate)

    # -- the queue ---------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._kicking or not self.queued:
            return
        self._kicking = True
        try:
            for disagg, line in self._lines.items():
                while line and self._dispatch(line[0][2], disagg):
                    r = line.pop(0)[2]
                    self.queued -= 1
                    self.queued_tokens -= r.prompt_len
                    self._line_tokens[disagg] -= r.prompt_len
        finally:
            self._kicking = False

    def _dispatch(self, r: SimRequest, disagg: bool) -> bool:
        n = r.prompt_len
        while True:
            if self.costed is not None:
                ask, slo = self._asks[r.idx]
                picked = self.costed.pick(ask, disagg, self._unfit.get(r.idx, set()), slo)
                if picked is None or picked is NO_PREFILL:
                    return False
                decode, prefill = picked
                if not disagg or decode.reserve(r):
                    del self._asks[r.idx]
                    self._unfit.pop(r.idx, None)
                    break
                decode.heartbeat.without_room()  # its heartbeat was stale: full until the next
                self._changed(decode)
            elif disagg:
                decode = self._disagg_pick.pick(n)
                prefill = self._prefill_pick.pick() if decode is not None else None
                if prefill is None:
                    return False
                if decode.reserve(r):
                    break
                decode.heartbeat.without_room()
                self._changed(decode)
            else:
                decode, prefill = self._pick_local(r), None
                if decode is None:
                    return False
                break
        now = self.loop.now
        r.t_dispatch = now
        decode.in_flight += 1
        prefiller = prefill if disagg else decode
        prefiller.sent_tokens += n
        prefiller.sent[r.idx] = (now, n)
        if self.sent_slo is not None:
            stall = (0.0 if disagg else self.costed.stall_s(decode, n) if self.costed
                     else stall_s(_Record(decode), n))
            self.book.joined(decode.worker_id, str(r.idx), stall,
                             decoding(self.sent_slo.tpot_ms, r.output_len))
        if disagg:
            prefill.in_flight += 1
            r.prefill = prefill
            prefill.add_prefill(r)
            self._changed(prefill)
        else:
            r.decode = decode
            decode.add_prefill(r)
        self._changed(decode)
        return True

    def _local_index(self) -> tuple[DecodePicker, PrefillPicker]:
        """The decode choice and the admission backlog over the workers that prefill
        locally (decode and colocated)."""
        if self._local is None:
            limit = self.config.max_in_flight_per_worker
            self._local = (DecodePicker(self.holders, limit), PrefillPicker(self.holders, limit))
            for w in self.holders:  # ranked now by their current loads
                w.indexes = [*w.indexes, *self._local]
                w.ranked = w.load()
        return self._local

    def _pick_local(self, r: SimRequest):
        unfit = self._unfit.pop(r.idx, set())
        if not unfit:
            return self._local_index()[0].pick(r.prompt_len)
        limit = self.config.max_in_flight_per_worker
        chosen = self._local_index()[0].first(
            lambda load: load.worker_id not in unfit and decode_fits(load, r.prompt_len, limit))
        if chosen is None:
            self._unfit[r.idx] = unfit  # still waiting: keep them passed over
        return chosen

    # -- what the workers report ------------------------------------------------------------

    def _prefilled(self, r: SimRequest) -> None:
        """A prefill worker finished the prompt: its KV reaches the decode worker (the layers
        stream while the prefill computes; the last layer's part is left after it)."""
        t = self.profile.transfer
        nbytes = r.prompt_len * self.profile.kv_bytes_per_token
        ready = max(self.loop.now + t.seconds(nbytes * self._per_layer),
                    r.t_prefill_start + t.seconds(nbytes))
        self.loop.at(ready, self._kv_delivered, r)

    def _kv_delivered(self, r: SimRequest) -> None:
        r.t_kv = self.loop.now
        r.prefill.release_held(r)
        r.decode.kv_arrived(r)
        # nothing the router sees of the decode worker changed (its load is the last
        # heartbeat's and the router's counts): only the queue may move, the worker's
        # blocks having changed
        self._kick()

    def _first_token(self, r: SimRequest) -> None:
        prefiller = r.prefill if r.disagg else r.decode
        prefiller.sent_tokens -= r.prompt_len
        prefiller.sent.pop(r.idx, None)
        if r.disagg:  # the hand-off: the prefill slot comes back
            r.prefill.in_flight -= 1
            self.slots.released(self.queued > 0, self.loop.now)
            self._changed(r.prefill)
        else:
            self._changed(r.decode)

    def _finished(self, r: SimRequest) -> None:
        self.open -= 1
        r.decode.in_flight -= 1
        if self.sent_slo is not None:
            self.book.left(r.decode.worker_id, str(r.idx))
        self.slots.released(self.queued > 0, self.loop.now)
        for observe in self.observers:
            observe(r)
        self._changed(r.decode)

    def _changed(self, w: SimWorker) -> None:
        """`w`'s load or meters may have changed: keep the sums and indexes current, then
        try the queue. Every index holding `w` was last ranked by `w.ranked`."""
        if w.heartbeat.rate != w.summed_rate and w.serving:
            self._sum_rate(w)
        if (load := w.load()) is not w.ranked:
            w.ranked = load
            for index in w.indexes:
                index.update(w, load)
        if self.queued and not self._kicking:
            self._kick()

    def _sum_rate(self, w: SimWorker) -> None:
        """`w`'s published prefill rate into its role's sum, in place of the last one."""
        rate, old = w.heartbeat.rate, w.summed_rate
        w.summed_rate = rate
        agg = self._rates[w.role is not WorkerRole.PREFILL]
        agg[0] += (rate <= 0) - (old <= 0)
        agg[1] += rate - old

    def _end(self, r: SimRequest, state: State, why: str) -> None:
        self.open -= 1
        r.state, r.error, r.t_end = state, why, self.loop.now
        self._asks.pop(r.idx, None)
        for observe in self.observers:
            observe(r)
