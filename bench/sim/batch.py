"""The decoding sequences of a simulated worker, in aggregate: how many, the context their
next step attends to, the step at which each finishes (a heap), and which steps start a new
KV block for how many of them, so a step costs O(1) plus the sequences that join or leave.

A sequence joins after the worker's step `join` holding `target` tokens of KV and `generated`
tokens out; its i-th step attends to target + i tokens and needs a new block when the
target + i - 1 tokens it holds fill whole blocks: at the worker's steps s with
(target - join - 1 + s) % block_size == 0, its residue class. Ownership: the batch keeps no
blocks; the worker counts them, asking `blocks_at` / `blocks_over` what the sequences take.
A sequence that leaves (finished or preempted) has its epoch bumped, so its heap entry is
skipped when it surfaces.
"""

from __future__ import annotations

import heapq

from pdserve.bench.sim import leap
from pdserve.bench.sim.request import SimRequest, State


class DecodeBatch:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.size = 0
        self.context = 0  # KV tokens the next step attends to, summed over the sequences
        self.members: list[SimRequest] = []  # join order, newest last; pruned lazily
        self._finishes: list[tuple[int, int, int, SimRequest]] = []  # (step, idx, epoch, r)
        self._growth = [0] * block_size  # sequences by residue class

    def join(self, r: SimRequest, steps: int, admitted: int) -> None:
        """`r` (state DECODING, `target` tokens of KV, `generated` out) decodes from the
        worker's step `steps` + 1 until it has `output_len` tokens."""
        r.epoch += 1
        r.join_step = steps
        r.finish_step = steps + r.output_len - r.generated
        r.admitted = admitted
        r.residue = (r.target - steps - 1) % self.block_size
        self._growth[r.residue] += 1
        self.size += 1
        self.context += r.target + 1
        self.members.append(r)
        heapq.heappush(self._finishes, (r.finish_step, r.idx, r.epoch, r))

    def leave(self, r: SimRequest, steps: int) -> int:
        """`r` leaves after the worker's step `steps`; the steps it decoded."""
        done = steps - r.join_step
        self.size -= 1
        self.context -= r.target + 1 + done
        self._growth[r.residue] -= 1
        r.epoch += 1
        return done

    def advance(self, k: int) -> None:
        """`k` steps ran: every sequence attends to k more tokens."""
        self.context += self.size * k

    def due(self, steps: int) -> list[SimRequest]:
        """The sequences whose last token came by step `steps`, out of the batch."""
        heap, out = self._finishes, []
        while heap and heap[0][0] <= steps:
            _, _, epoch, r = heapq.heappop(heap)
            if epoch == r.epoch:
                out.append(r)
        return out

    def finishes_by(self, steps: int) -> bool:
        """Whether a finish (maybe of a sequence that left since) is due by step `steps`."""
        heap = self._finishes
        return bool(heap) and heap[0][0] <= steps

    def next_finish(self) -> int | None:
        """The step of the soonest finish, or None."""
        heap = self._finishes
        while heap and heap[0][2] != heap[0][3].epoch:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def blocks_at(self, step: int) -> int:
        """Blocks the sequences take as step `step` begins."""
        return self._growth[(-step) % self.block_size]

    def blocks_over(self, first: int, last: int) -> int:
        """Blocks they take over steps first..last."""
        return leap.growth(self._growth, first, last, self.size)

    def newest(self) -> SimRequest | None:
        while self.members and self.members[-1].state is not State.DECODING:
            self.members.pop()
        return self.members[-1] if self.members else None

    def live(self) -> list[SimRequest]:
        """The sequences now in the batch (pruning those that left, now and then)."""
        if len(self.members) > 2 * self.size + 64:
            self.members = [r for r in self.members if r.state is State.DECODING]
        return [r for r in self.members if r.state is State.DECODING]
