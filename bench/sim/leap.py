"""Many decode steps as one event: while a worker's batch does not change (no prompt to
prefill, nothing joins or leaves), its steps follow in closed form, so the simulator jumps
to the step where the next sequence finishes instead of stepping through each.

A batch of B sequences whose next step attends to C context tokens takes, at its i-th step
from now, a + c * (C + i * B) seconds (a: the step's fixed and per-token part for B
tokens, c: the cost of one context token); each step adds B to the context. Blocks: a
sequence takes a new block at the steps its residue class names (SimWorker), so the
blocks a run of steps takes are counted per residue.
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
    # the root's rounding: settle on the exact count
    while k > 0 and run_s(a, c, context, batch, k) > elapsed:
        k -= 1
    while run_s(a, c, context, batch, k + 1) <= elapsed:
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
    for s in range(first, first + rest):
        blocks += counts[(-s) % size]
    return blocks
