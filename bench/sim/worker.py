"""A simulated worker: the engine's scheduler (engine/scheduler.py) in time, with a step
costed by the cost profile instead of computed.

Each step, as the engine schedules one: the decoding sequences first (a token each), then
the prompts being prefilled in the order they started, then waiting prompts while the
token budget (`max_num_batched_tokens`) and `max_num_seqs` allow, each chunk as large as
the budget left. KV blocks are counted exactly: a prompt's chunks take blocks as they go, a
decoding sequence takes one more each time its length crosses a block boundary, a decode
reservation holds the prompt's blocks from dispatch. When blocks run out, the newest
running request is preempted by recompute (its blocks freed, its prompt and tokens so far
prefilled again), as the engine does. Prefix caching is not modelled.

Roles: a prefill worker only prefills (its KV stays held until the decode side has it); a
decode worker decodes what arrives by KV transfer and prefills locally what the router
sends it whole; a colocated worker prefills and decodes everything it gets. Arrived KV is
admitted between steps, its first token streamed at once, as decode_worker/jobs.py does.
An adaptive worker changes role by draining first (bench.sim.switch).

A step's time is the profile's step model, plus the serving path's cost per decoding
sequence, times the contention factor while a neighbour on the same host computes.

Decoding sequences are kept in aggregate (their count, summed context, and a heap of the
steps at which each finishes), so a step costs O(1) plus the requests that join or leave,
and a run of steps whose batch does not change is one event (bench.sim.leap), cut short
when something arrives for the worker. The worker measures its prefill rate and decode step
time with the workers' own meters (worker.rate) and publishes them with its load every
`heartbeat_s`; the router sees only what was published, plus its own counts.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from collections.abc import Callable

from pdserve.bench.sim import leap
from pdserve.bench.sim.batch import DecodeBatch
from pdserve.bench.sim.blocks import Blocks
from pdserve.bench.sim.events import EventLoop
from pdserve.bench.sim.heartbeat import Heartbeat
from pdserve.bench.sim.request import SimRequest, State
from pdserve.bench.sim.switch import Switching
from pdserve.protocol import WorkerRole
from pdserve.protocol.cost_profile import CostProfile, chunk_pairs
from pdserve.router.policy import WorkerLoad
from pdserve.worker.rate import MIN_PREFILL_TOKENS, DecodeStepTime, PrefillRate


class SimWorker(leap.Leaping, Blocks, Switching):
    def __init__(self, worker_id: str, role: WorkerRole, loop: EventLoop,
                 profile: CostProfile, *, max_num_batched_tokens: int, max_num_seqs: int,
                 block_size: int, num_blocks: int, keep_token_times: bool = False,
                 heartbeat_s: float = 0.5, prefill_pack_tokens: int | None = None):
        self.worker_id, self.role, self.loop, self.profile = worker_id, role, loop, profile
        self.budget, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.pack = prefill_pack_tokens  # as the engine's prefill-only steps pack prompts
        self.block_size, self.num_blocks = block_size, num_blocks
        self.keep_token_times = keep_token_times
        self._leaps = not keep_token_times  # every token's time kept: step by step
        self.used_blocks = 0
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []
        self.queued_tokens = 0  # prompt tokens waiting or not yet computed
        self.arrived: list[SimRequest] = []  # KV here, admitted before the next step
        self.decoding = DecodeBatch(block_size)
        self.steps = 0
        self._leap: leap.Run | None = None  # the leap under way
        self._step_a: dict[int, float] = {}  # batch size -> a leap's step cost but context
        self._context_s = profile.step.context_s
        self._admissions = itertools.count(1)  # entries into the running set: "the newest"
        self.busy = False
        self.in_flight = 0  # the router's requests on this worker (the router keeps it)
        self.sent_tokens = 0  # prompt tokens the router sent it, no first token yet (ditto)
        # request index -> (simulated time sent, prompt tokens), as router.ledger's `sent`
        self.sent: dict[int, tuple[float, int]] = {}
        # (the router's) the worker indexes it is in, the load they ranked it by, and the
        # prefill rate the router has summed for it
        self.indexes: list = []
        self.ranked: WorkerLoad | None = None
        self.summed_rate = 0.0
        self.rate = PrefillRate()
        self.step_time = DecodeStepTime()
        self.busy_s = 0.0
        self.preemptions = 0
        self.neighbours: list[SimWorker] = []  # workers on the same host (contention)
        self.heartbeat = Heartbeat(self, heartbeat_s)
        self._load: WorkerLoad | None = None  # load()'s last answer, and what it came from
        self._load_record: tuple | None = None
        self._load_sent = 0
        # the router's hooks: a prefill ended (prefill worker), a first token, an end, and
        # "my load changed"
        self.on_prefilled: Callable[[SimRequest], None] = lambda r: None
        self.on_first_token: Callable[[SimRequest], None] = lambda r: None
        self.on_finished: Callable[[SimRequest], None] = lambda r: None
        self.on_change: Callable[[SimWorker], None] = lambda w: None

    # -- what the router sees -----------------------------------------------------------------

    def load(self) -> WorkerLoad:
        """As the router sees it: the last heartbeat's figures, its own in-flight count,
        and the prefill queue it reported or what the router sent since, if more
        (router.ledger)."""
        record, sent, in_flight = self.heartbeat.record, self.sent_tokens, self.in_flight
        load = self._load
        # the same figures give the same object back, so the router's index sees "no
        # change" by identity (a heartbeat record is a new tuple whenever it changes)
        if (load is not None and record is self._load_record and sent == self._load_sent
                and in_flight == load.in_flight):
            return load
        free, running, waiting, queued = record
        load = WorkerLoad(self.worker_id, free, self.num_blocks, self.block_size, running,
                          waiting, max(queued, sent), in_flight)
        self._load, self._load_record, self._load_sent = load, record, sent
        return load

    def warm_up(self) -> None:
        """Start with the meters a warm-up leaves: the prefill rate of a full chunk (up to
        1,024 tokens) and the step time of one decoding sequence, both published."""
        n = min(self.budget, 1024)
        self.rate.tokens_per_s = n / self.profile.step.step_s(n, chunk_pairs(0, n))
        self.step_time.seconds = self.profile.step.step_s(1, 0, n, 1) + self.profile.serve_seq_s
        self.heartbeat.publish_meters(*self.meters())

    def free_blocks(self, k: int | None = None) -> int:
        """Free now. A leap took the blocks of all its steps at its start; those of the
        steps not begun yet are not taken, as stepping one by one they would not be.
        `k`: the leap's steps done by now, when the caller has worked it out."""
        used = self.used_blocks
        run = self._leap
        if run is not None:
            if k is None:
                k = run.steps_done(self.loop.now)
            used -= self.decoding.blocks_over(self.steps + k + 2, self.steps + run.m)
        return self.num_blocks - used

    def published(self) -> tuple[tuple[int, int, int, int], tuple[float, float]]:
        """What a heartbeat publishes now: free blocks, running, waiting, queued tokens;
        and the meters (`meters`)."""
        run = self._leap
        k = run.steps_done(self.loop.now) if run is not None else 0
        return ((self.free_blocks(k), self.decoding.size + len(self.prefilling),
                 len(self.waiting), self.queued_tokens), self.meters(k))

    def meters(self, k: int | None = None) -> tuple[float, float]:
        """The prefill rate and decode step time now; mid-leap, with the leap's `k` steps
        done so far (worked out when None) observed, as stepping one by one they would
        have been."""
        run = self._leap
        if k is None:
            k = run.steps_done(self.loop.now) if run is not None else 0
        if not k:
            return self.rate.tokens_per_s, self.step_time.seconds
        rate = self.rate
        # a decode-only step with no backlog takes the sample gathered; one too small to
        # count leaves the rate as it is (PrefillRate.flush), so it is not copied to tell
        if rate._tokens >= MIN_PREFILL_TOKENS:
            rate = copy.copy(rate)
            rate.flush()
        meter = self.step_time
        return rate.tokens_per_s, leap.ewma(meter.seconds, meter.weight,
                                            run.a + run.c * run.context, run.c * run.batch, k)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- what the router asks -------------------------------------------------------------------

    def reserve(self, r: SimRequest) -> bool:
        """Hold the prompt's blocks for its KV; False when they do not fit now (the
        router's view of the worker was stale)."""
        need = self.blocks_for(r.prompt_len)
        # a leap holds the blocks of all its steps: what fits beside them leaves the leap
        # as it is (stepping one by one, no step of it would run short)
        beside_leap = need <= self.num_blocks - self.used_blocks
        if not beside_leap and need > self.free_blocks():
            return False
        r.blocks = need
        self.used_blocks += need
        r.decode = self
        if self._leap is not None and not beside_leap:  # its later steps may run short
            self._cut_leap()
        return True

    def add_prefill(self, r: SimRequest) -> None:
        """Prefill the prompt here: a prefill job, or a local one on a decode or
        colocated worker."""
        self.waiting.append(r)
        self.queued_tokens += r.target - r.computed
        self._kick()

    def kv_arrived(self, r: SimRequest) -> None:
        self.arrived.append(r)
        self._kick()

    def release_held(self, r: SimRequest) -> None:
        """(prefill worker) the decode side has the KV: free what the job held."""
        self.used_blocks -= r.held
        r.held = 0
        self.drained()

    # -- steps ----------------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self.busy:
            self._start_step()
        elif self._leap is not None:
            self._cut_leap()

    def _start_step(self) -> None:
        now = self.loop.now
        if self.arrived:
            for r in self.arrived:  # KV that came during the last step: first token now
                r.t_first = now
                r.generated = 1
                self._emit(r)
                self.on_first_token(r)
                self._join_or_finish(r)
            self.arrived.clear()
        decoding = self.decoding
        if decoding.blocks_at(self.steps + 1):  # the next step starts blocks
            self._grow_decodes()
        decodes = decoding.size
        if not self.prefilling and not self.waiting:  # decodes only (a decode worker's lot)
            if not decodes:
                self._idle()
                return
            # busy before: no neighbour starts to contend now (_compute's first part)
            if self.busy and self._leaps and not (self.neighbours and self._contended()):
                if not self._start_leap():
                    self._compute([], 0, decodes, leap=False)
                return
            chunks, pairs = [], 0
        else:
            chunks, pairs = self._chunks(now, decodes)
        self._compute(chunks, pairs, decodes)

    def _idle(self) -> None:
        self.busy = False
        self.rate.flush()
        self.drained()  # a draining worker that holds nothing now takes its new role

    def _chunks(self, now: float, decodes: int) -> tuple[list[tuple[SimRequest, int]], int]:
        """The prompt chunks the next step computes (taking their blocks), and their
        attention pairs."""
        budget = self.budget - decodes
        chunks: list[tuple[SimRequest, int]] = []
        pairs = 0
        for r in self.prefilling:
            if budget <= 0:
                break
            n = min(r.target - r.computed, budget)
            if not self._take_blocks(r, r.computed + n):
                break
            chunks.append((r, n))
            pairs += chunk_pairs(r.computed, n)
            budget -= n
        while (self.waiting and budget > 0
               and self.decoding.size + len(self.prefilling) < self.max_num_seqs):
            r = self.waiting[0]
            if (self.pack is not None and chunks and self.role is WorkerRole.PREFILL
                    and r.target - r.computed > self.pack - sum(n for _, n in chunks)):
                break  # the engine packs a prompt only whole and within its limit
            n = min(r.target - r.computed, budget)
            if not self._take_blocks(r, r.computed + n):
                break
            self.waiting.popleft()
            if r.generated == 0 and r.computed == 0:
                r.t_prefill_start = now
            r.state = State.PREFILLING
            r.admitted = next(self._admissions)
            self.prefilling.append(r)
            chunks.append((r, n))
            pairs += chunk_pairs(r.computed, n)
            budget -= n
        return chunks, pairs

    def _compute(self, chunks: list[tuple[SimRequest, int]], pairs: int, decodes: int,
                 leap: bool = True) -> None:
        """Start the step (or a leap, unless `leap` is False: tried already), or go idle when
        there is nothing to compute."""
        if not chunks and not decodes:
            self._idle()
            return
        if not self.busy and self.neighbours:  # starting to compute: neighbours slow down
            for n in self.neighbours:
                if n._leap is not None and self._contends():
                    n._cut_leap()
        contended = self._contended()
        if leap and not chunks and not self.waiting and self._leaps and not contended \
                and self._start_leap():
            return
        backlog = bool(self.queued_tokens)
        tokens = decodes + sum(n for _, n in chunks)
        seconds = (self.profile.step.step_s(tokens, pairs, self.decoding.context, decodes)
                   + self.profile.serve_seq_s * decodes)
        if contended:
            seconds *= 1.0 + (self.profile.contention_prefill if chunks
                              else self.profile.contention_decode)
        self.busy = True
        self.loop.after(seconds, self._end_step, chunks, decodes, seconds, backlog)

    def _end_step(self, chunks, decodes: int, seconds: float, backlog: bool) -> None:
        now = self.loop.now
        self.busy_s += seconds
        self.steps += 1
        self.decoding.advance(1)
        if self.keep_token_times and decodes:
            for r in self.decoding.live():
                if r.token_times is not None:
                    r.token_times.append(now)
        self._finish_due()
        prefill_tokens = 0
        for r, n in chunks:
            r.computed += n
            self.queued_tokens -= n
            prefill_tokens += n
            if r.computed == r.target:
                self.prefilling.remove(r)
                self._prefill_done(r)
        self.rate.observe(prefill_tokens, seconds, backlog)
        self.step_time.observe(prefill_tokens, decodes, seconds)
        self._start_step()

    def _contended(self) -> bool:
        """A neighbour on this host computes now (its step slows this one's). A host of
        neighbours steps one by one: their steps' times depend on each other."""
        return bool(self.neighbours) and self._contends() and any(n.busy
                                                                  for n in self.neighbours)

    def _contends(self) -> bool:
        return self.profile.contention_decode > 0 or self.profile.contention_prefill > 0

    def _finish_due(self) -> None:
        """End the decoding sequences whose last token the steps so far produced."""
        for r in self.decoding.due(self.steps):
            self._leave_batch(r)
            r.generated = r.output_len
            self._finish(r)

    def _prefill_done(self, r: SimRequest) -> None:
        now = self.loop.now
        if self.role is WorkerRole.PREFILL:
            r.t_prefill_end = now
            r.state = State.TRANSFERRING
            self.on_prefilled(r)  # its blocks stay held until the KV is delivered
            return
        if r.generated == 0:  # its first prefill: the first token
            r.t_prefill_end = r.t_first = now
            self.on_first_token(r)
        r.generated += 1  # after a preemption: the next token
        self._emit(r)
        self._join_or_finish(r)

    def _emit(self, r: SimRequest) -> None:
        if r.token_times is not None:  # kept (simulate's keep_itl)
            r.token_times.append(self.loop.now)

    def _join_or_finish(self, r: SimRequest) -> None:
        """`r` has its KV here (target tokens) and `generated` tokens: it decodes the rest
        one a step, or is done."""
        left = r.output_len - r.generated
        if left <= 0:
            return self._finish(r)
        r.state = State.DECODING
        self.decoding.join(r, self.steps, next(self._admissions))

    def _leave_batch(self, r: SimRequest) -> int:
        """`r` leaves the decode batch (after `self.steps`): its KV is target + done tokens,
        in the blocks it holds from now on; the steps it decoded."""
        done = self.decoding.leave(r, self.steps)
        r.blocks = self.blocks_for(r.target + done)
        return done

    def _finish(self, r: SimRequest) -> None:
        r.state = State.FINISHED
        r.t_end = self.loop.now
        self.used_blocks -= r.blocks
        r.blocks = 0
        self.on_finished(r)
