"""A SimWorker's KV blocks (mixed into it): taking them for prompt chunks and decode
growth, and preempting the newest running request by recompute when they run out, as the
engine does. Uses the worker's `role`, `used_blocks`, `num_blocks`, `decoding`,
`prefilling`, `waiting`, `queued_tokens`, `steps`, `preemptions` and `_leave_batch`.
"""

from __future__ import annotations

from pdserve.bench.sim.request import SimRequest, State
from pdserve.protocol import WorkerRole


class Blocks:

    def _take_blocks(self, r: SimRequest, tokens: int) -> bool:
        need = self.blocks_for(tokens) - self._blocks_of(r)
        if need <= 0:
            return True
        if need > self.num_blocks - self.used_blocks:
            return False
        self.used_blocks += need
        self._set_blocks(r, self._blocks_of(r) + need)
        return True

    def _blocks_of(self, r: SimRequest) -> int:
        """What `r` holds here: a prefill worker's blocks are its own (`held`), apart
        from the reservation on its decode worker."""
        return r.held if self.role is WorkerRole.PREFILL else r.blocks

    def _set_blocks(self, r: SimRequest, blocks: int) -> None:
        setattr(r, "held" if self.role is WorkerRole.PREFILL else "blocks", blocks)

    def _grow_decodes(self) -> None:
        """Blocks for the sequences whose next token starts a block; while they do not fit,
        preempt the newest running request."""
        step = self.steps + 1
        while self.decoding.blocks_at(step) > self.num_blocks - self.used_blocks:
            self._preempt_newest()
        self.used_blocks += self.decoding.blocks_at(step)

    def _preempt_newest(self) -> None:
        newest_decode = self.decoding.newest()
        newest_prefill = max(self.prefilling, key=lambda r: r.admitted, default=None)
        if newest_prefill is not None and (newest_decode is None
                                           or newest_prefill.admitted > newest_decode.admitted):
            r = newest_prefill
            self.prefilling.remove(r)
            self.queued_tokens += r.computed
        else:
            r = newest_decode
            self.decoding.members.pop()
            done = self._leave_batch(r)
            r.generated += done
            r.target = r.prompt_len + r.generated
            self.queued_tokens += r.target
        self.used_blocks -= self._blocks_of(r)
        self._set_blocks(r, 0)
        r.computed = 0
        r.state = State.QUEUED
        self.preemptions += 1
        self.waiting.appendleft(r)
