"""The prefill worker's job table; every method runs on the engine loop's thread (a job's
life opens prefill_worker/worker.py).

Ownership: the engine owns every KV block. A job holds blocks while QUEUED or PREFILLING;
the engine frees them (full ones stay in its prefix cache) in the step that samples the
first token. The sender holds references to each layer's K/V until it has staged them, and
every transfer this table began is released when its job ends. Each job that ends reports
one PrefillOutcome to its order's notify endpoint.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pdserve.engine import Engine, RequestOutput, ScheduledBatch, ScheduledRequest
from pdserve.kvtransfer.base import KVSender, TransferStatus
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.protocol import (
    FinishReason,
    Handoff,
    PrefillOrder,
    PrefillOutcome,
    PrefillStamps,
    PrefillStatus,
)
from pdserve.worker.base import JobTable
from pdserve.worker.publisher import StreamPublisher


class PrefillState(enum.Enum):
    """A live job's state; how it ended is its outcome's PrefillStatus."""

    QUEUED = "queued"  # in the engine's waiting queue, transfer opened
    PREFILLING = "prefilling"  # chunks computing; each layer's KV leaves as it is computed
    TRANSFERRING = "transferring"  # first token sampled and sent; waiting for the ack


@dataclass
class _Job:
    order: PrefillOrder
    state: PrefillState = PrefillState.QUEUED
    sent_upto: int = 0  # KV of positions [0, sent_upto) went out for every layer
    num_cached_tokens: int = 0
    stamps: PrefillStamps = field(default_factory=PrefillStamps)


class PrefillJobs(JobTable):
    def __init__(self, engine: Engine, sender: KVSender, publisher: StreamPublisher):
        super().__init__(engine, publisher)
        self.sender = sender
        self.jobs: dict[str, _Job] = {}
        self._step_sends: list[tuple[_Job, ScheduledRequest, int]] = []

    def add(self, order: PrefillOrder, received: float, begun: bool) -> None:
        """Queue the job. `begun`: the worker opened its transfer already (the handshake and
        keep-alives run while it waits); False when the id is live here, which is refused."""
        tid = order.transfer_id
        entry = _Job(order, stamps=PrefillStamps(received=received))
        try:
            if not begun:
                raise ValueError(f"transfer id {tid!r} is already in use")
            self.engine.add_request(tid, order.prompt_token_ids, order.sampling)
        except ValueError as e:  # nothing of it is held, and the live job is untouched
            if begun:
                self.sender.release(tid)
            return self._report(entry, PrefillStatus.FAILED, f"refused: {e}")
        self.jobs[tid] = entry
        self._set(entry, PrefillState.QUEUED)

    def abort(self, transfer_id: str, reason: str) -> None:
        entry = self.jobs.get(transfer_id)
        if entry is None:
            return
        self.engine.abort(transfer_id)
        self.sender.abort(transfer_id, reason)
        self._settle(entry, PrefillStatus.ABORTED, reason)
        self.publisher.flush()

    def router_endpoint(self, entry: _Job) -> str:
        return entry.order.notify_endpoint

    # -- LoopHandler -----------------------------------------------------------------------

    def before_step(self, batch: ScheduledBatch):
        self._step_sends = []
        offset = 0  # where each item's tokens start in the step's flat token order
        for item in batch.requests:
            entry = self.jobs.get(item.request.request_id)
            if entry is not None:
                if entry.state is PrefillState.QUEUED:
                    entry.stamps.prefill_start = time.time()
                    self._set(entry, PrefillState.PREFILLING)
                self._step_sends.append((entry, item, offset))
            offset += item.num_new_tokens
        return self._send_layer if self._step_sends else None

    def _send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Per-layer hook: `k`, `v` are `[step tokens, kv_heads, head_dim]` of this layer,
        freshly computed and never written again, so the sender may stage them later."""
        cache_k, cache_v = self.engine.kv_cache.layer(layer)
        for entry, item, offset in self._step_sends:
            tid, lo = entry.order.transfer_id, entry.sent_upto
            if not entry.stamps.kv_send_start:
                entry.stamps.kv_send_start = time.time()
            if item.start > lo:  # prefix-cache hit: copied now, the cache blocks may move on
                blocks = item.request.block_ids
                self.sender.send_layer(tid, layer, lo,
                                       gather_tokens(cache_k, blocks, lo, item.start),
                                       gather_tokens(cache_v, blocks, lo, item.start))
            first = max(item.start, lo)
            if item.end > first:
                a, b = offset + first - item.start, offset + item.num_new_tokens
                self.sender.send_layer(tid, layer, first, k[a:b], v[a:b])

    def after_step(self, outputs: list[RequestOutput]) -> None:
        for entry, item, _ in self._step_sends:
            entry.sent_upto = max(entry.sent_upto, item.end)
        self._step_sends = []
        for out in outputs:
            entry = self.jobs.get(out.request_id)
            if entry is None:
                continue
            if out.finish_reason is FinishReason.ERROR:  # the engine failed it, blocks freed
                self.sender.abort(out.request_id, out.error)  # the decode side learns why
                self._settle(entry, PrefillStatus.FAILED, out.error)
                continue
            entry.num_cached_tokens = out.num_cached_tokens
            entry.stamps.prefill_end = time.time()
            note = Handoff(out.num_cached_tokens, entry.stamps.prefill_start,
                           entry.stamps.prefill_end)
            self.sender.finish(out.request_id, out.new_token_ids[0], note.encode())
            self._set(entry, PrefillState.TRANSFERRING)

    def tick(self) -> None:
        self.sweep()
        for tid, entry in list(self.jobs.items()):
            result = self.sender.poll(tid)
            if result.status is TransferStatus.DONE:
                entry.stamps.kv_send_end = time.time()
                self._settle(entry, PrefillStatus.DONE)
            elif result.status is TransferStatus.FAILED:
                self.engine.abort(tid)
                self._settle(entry, PrefillStatus.FAILED, f"KV transfer failed: {result.reason}")
        self.publisher.flush()

    def idle_wait(self) -> float:
        return 0.001 if self.jobs else 0.1  # waiting for acks: notice them promptly

    def close(self) -> None:
        try:
            for tid, entry in list(self.jobs.items()):
                self.engine.abort(tid)
                self.sender.abort(tid, "prefill worker closed")  # the decode side learns why
                self._settle(entry, PrefillStatus.FAILED, "prefill worker closed")
        finally:
            self.sender.close()
            self.publisher.close()

    # -- internals -------------------------------------------------------------------------

    def _set(self, entry: _Job, state: PrefillState) -> None:
        entry.state = state
        self.states[entry.order.transfer_id] = state

    def _settle(self, entry: _Job, status: PrefillStatus, reason: str = "") -> None:
        tid = entry.order.transfer_id
        self.sender.release(tid)
        del self.jobs[tid]
        self.states.pop(tid, None)
        self._report(entry, status, reason)

    def _report(self, entry: _Job, status: PrefillStatus, reason: str) -> None:
        self.publisher.add_outcome(entry.order.notify_endpoint, PrefillOutcome(
            entry.order.transfer_id, status, reason, entry.num_cached_tokens, entry.stamps))
