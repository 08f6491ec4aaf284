"""Many decode steps as one event: while a worker's batch does not change (no prompt to
prefill, nothing joins or leaves), its steps follow in closed form, so the simulator jumps
to the step where the next sequence finishes instead of stepping through each.

A batch of B sequences whose next step attends to C context tokens takes, at its i-th step
from now, a + c * (C + i * B) seconds (a: the step's fixed and per-token part for B
tokens, c: the cost of one context token); each step adds B to the context. Blocks: a
sequence takes a new block at the steps its residue class names (SimWorker), so the
blocks a run of steps takes are counted per residue.

A run can be cut short (something came for the worker): its end event is then stale and
does nothing when it surfaces; the meters see every step of a run, as stepping one by
one, so where a run is cut changes no figure the worker publishes.
"""

from __future__ import annotations

import math


def run_s(a: float, c: float, context: int, batch: int, k: int) -> float:
    """Seconds of the next `k` steps."""
    return k * a + c * (k * context + batch * k * (k - 1) / 2)


def steps_done(a: float, c: float, context: int, batch: int, elapsed: float) -> int:
    """How many whole steps of the run fit in `elapsed` seconds."""
    if elapsed <= 0:
        return 0
    qa, qb = c * batch / 2, a + c * context - c * batch / 2
    if qa > 0:
        k = int((-qb + math.sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa))
    else:
        k = int(elapsed / qb) if qb > 0 else 0
    # the root's rounding: settle on the exact count (run_s, inline: this is hot)
    while k > 0 and k * a + c * (k * context + batch * k * (k - 1) / 2) > elapsed:
        k -= 1
    while (k + 1) * a + c * ((k + 1) * context + batch * (k + 1) * k / 2) <= elapsed:
        k += 1
    return k


def growth(counts: list[int], first: int, last: int, total: int | None = None) -> int:
    """Blocks the decoding sequences take over steps first..last (inclusive): a sequence
    of residue q takes one at each step s with (-s) % block_size == q. `total`:
    sum(counts), when the caller keeps it."""
    if last < first:
        return 0
    size = len(counts)
    cycles, rest = divmod(last - first + 1, size)
    blocks = cycles * (sum(counts) if total is None else total)  # every residue, once a cycle
    if rest:
        # steps first, first+1, ... name residues q, q-1, ... (mod size): a slice, or two
        q = (-first) % size
        lo = q - rest + 1
        blocks += sum(counts[lo:q + 1]) if lo >= 0 else sum(counts[:q + 1]) + sum(counts[lo:])
    return blocks


def ewma(s: float, w: float, first: float, step: float, k: int) -> float:
    """An exponential moving average `s` of weight `w` (0.0: no sample yet, so the first
    is taken whole, as worker.rate's meters do) after the samples first + i * step,
    i = 0..k-1, observed one by one: a run's step times, every step weighed as if stepped."""
    if k <= 0:
        return s
    if not s:
        s, first, k = first, first + step, k - 1
    if k <= 16:  # short runs (the usual): the meter's own recurrence
        for i in range(k):
            s += w * (first + step * i - s)
        return s
    r = 1.0 - w
    rk = r ** k
    s0 = (1.0 - rk) / w  # sum of r^j, j < k
    s1 = (r - k * rk + (k - 1) * rk * r) / (w * w)  # sum of j * r^j, j < k
    return rk * s + w * (first * s0 + step * ((k - 1) * s0 - s1))


class Run:
    """A leap under way: begun at `t0`, `m` steps long, its i-th step a + c * (context +
    i * batch) seconds; it ends after step `to` (m, or fewer once cut). An end event
    carries the Run and its step count, and is stale unless both are still current."""

    __slots__ = ("t0", "m", "a", "c", "context", "batch", "to")

    def __init__(self, t0: float, m: int, a: float, c: float, context: int, batch: int):
        self.t0, self.m, self.a, self.c, self.context, self.batch = t0, m, a, c, context, batch
        self.to = m

    def steps_done(self, now: float) -> int:
        return steps_done(self.a, self.c, self.context, self.batch, now - self.t0)

    def seconds(self, k: int) -> float:
        return run_s(self.a, self.c, self.context, self.batch, k)


class Leaping:
    """A SimWorker's leaps (mixed into it): `_start_leap` runs the steps up to the batch's
    next finish as one event when nothing else is due, `_cut_leap` ends the one under way
    at the end of the step in progress, `_end_leap` settles its steps. Uses the worker's
    `decoding`, `steps`, `used_blocks`, `num_blocks`, `profile`, `loop`, meters, `_leap`,
    `_step_a` (a step's cost but context, by batch size), `_context_s` and `_finish_due` /
    `_start_step`."""

    def _start_leap(self) -> bool:
        """Run the steps up to the next finish as one event, if there are several and their
        blocks fit (the first step's are taken already)."""
        decoding = self.decoding
        finish = decoding.next_finish()
        steps = self.steps
        m = finish - steps if finish is not None else 0
        if m < 2:
            return False
        batch = decoding.size
        more = decoding.blocks_over(steps + 2, steps + m)
        if more > self.num_blocks - self.used_blocks:
            return False
        self.used_blocks += more
        a = self._step_a.get(batch)
        if a is None:  # a step's cost but for context depends on its batch size alone
            step = self.profile.step
            a = self._step_a[batch] = (step.base_s + max(step.floor_s, step.token_s * batch)
                                       + (step.seq_s + self.profile.serve_seq_s) * batch)
        loop = self.loop
        c, context = self._context_s, decoding.context
        run = self._leap = Run(loop.now, m, a, c, context, batch)
        self.busy = True
        loop.after(m * a + c * (m * context + batch * m * (m - 1) / 2), self._end_leap, run, m)
        return True

    def _cut_leap(self) -> None:
        """Something came for this worker mid-leap: end the leap at the end of the step in
        progress, so the next step takes it, as the engine would."""
        run = self._leap
        j = run.steps_done(self.loop.now) + 1
        if j >= run.to:
            return  # the leap ends there already (its own end, or an earlier cut's)
        run.to = j
        self.loop.at(run.t0 + run.seconds(j), self._end_leap, run, j)

    def _end_leap(self, run: Run, j: int) -> None:
        if run is not self._leap or j != run.to:
            return  # cut since, or a later leap's
        self._leap = None
        decoding = self.decoding
        steps = self.steps
        if j < run.m:  # cut: the blocks of the steps not run go back
            self.used_blocks -= decoding.blocks_over(steps + j + 1, steps + run.m)
        a, c, context, batch = run.a, run.c, run.context, run.batch
        seconds = j * a + c * (j * context + batch * j * (j - 1) / 2)  # run_s
        self.busy_s += seconds
        meter = self.step_time  # every step of the run observed, as stepping one by one
        meter.seconds = ewma(meter.seconds, meter.weight, a + c * context, c * batch, j)
        self.rate.observe(0, seconds, False)
        self.steps = steps = steps + j
        decoding.context += decoding.size * j  # advance(j)
        if decoding.finishes_by(steps):
            self._finish_due()
        self._start_step()
