"""The prefill worker's job table; every method runs on the engine loop's thread (a job's
life opens prefill_worker/worker.py).

Ownership: the engine owns every KV block. A job holds blocks from QUEUED until it ends:
its engine request is added with `hold_kv`, so the blocks outlive the first token until the
decode side acknowledges every layer (then the engine frees them; full ones stay in its
prefix cache), or until a HELD job is re-sent, aborted, or `hold_s` pass unclaimed. The
sender holds references to each layer's K/V until it has staged them, and every transfer
this table began is released when its job ends or leaves it. Each transfer a job had
reports one PrefillOutcome to its order's notify endpoint: HELD for one that failed while
the job kept its KV, otherwise how the job ended.

A job's engine request keeps the id of the job's first transfer (`engine_id`); a re-send
moves the job to the new transfer id, under which the router addresses it.
"""

from __future__ import annotations

import enum
import threading
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
    # the transfer failed after the prefill began: the KV stays (computing on, if midway)
    # for a re-send to another decode worker, `hold_s` after the prefill ended
    HELD = "held"



@dataclass
class _Job:
    order: PrefillOrder  # the current transfer's; a re-send replaces it
    engine_id: str  # the engine request's id: the first transfer's id
    state: PrefillState = PrefillState.QUEUED
    # KV of positions [0, sent_upto) is computed (and [kv_start, sent_upto) was sent, unless
    # HELD)
    sent_upto: int = 0
    num_cached_tokens: int = 0
    stamps: PrefillStamps = field(default_factory=PrefillStamps)
    first_token_id: int | None = None  # once the prefill ended
    hold_until: float | None = None  # HELD with the prefill ended: monotonic expiry


class PrefillJobs(JobTable):
    LEASED = frozenset({PrefillState.TRANSFERRING, PrefillState.HELD})
    def __init__(self, engine: Engine, sender: KVSender, publisher: StreamPublisher,
                 hold_s: float = 10.0):
        """`hold_s`: how long a HELD job whose prefill ended waits for a re-send order."""
        super().__init__(engine, publisher)
        self.sender = sender
        self.hold_s = hold_s
        self.jobs: dict[str, _Job] = {}
        self._by_engine: dict[str, _Job] = {}
        self._step_sends: list[tuple[_Job, ScheduledRequest, int]] = []
        self._claims: set[str] = set()  # transfer ids that a re-send order took (any thread)
        self._claims_lock = threading.Lock()

    def claim(self, order: PrefillOrder) -> bool:
        """(Any thread.) Whether `order` resumes the live job `order.resend_of` of the same
        prompt; if so that job is the order's: it is not ended for waiting unclaimed until
        `add` moves it. At most one order claims a job."""
        old = order.resend_of  # a live job of any state can move to a new transfer
        entry = self.jobs.get(old)
        if entry is None or entry.order.prompt_token_ids != order.prompt_token_ids:
            return False
        with self._claims_lock:
            if old in self._claims:
                return False
            self._claims.add(old)
            return True

    def unclaim(self, transfer_id: str) -> None:
        with self._claims_lock:
            self._claims.discard(transfer_id)

    def add(self, order: PrefillOrder, received: float, begun: bool,
            resume: bool = False) -> None:
        """Queue the job, or with `resume` (the order claimed `order.resend_of`) move that
        job to this order's transfer. `begun`: the worker opened the transfer already (the
        handshake and keep-alives run while it waits); False when the id is live here,
        which is refused."""
        tid = order.transfer_id
        if resume:
            self.unclaim(order.resend_of)
            held = self.jobs.get(order.resend_of)
            if begun and held is not None:
                return self._move(held, order)
            # gone meanwhile (its deadline, an abort): computed anew
        entry = _Job(order, tid, stamps=PrefillStamps(received=received))
        try:
            if not begun:
                raise ValueError(f"transfer id {tid!r} is already in use")
            self.engine.add_request(tid, order.prompt_token_ids, order.sampling, hold_kv=True)
        except ValueError as e:  # nothing of it is held, and the live job is untouched
            if begun:
                self.sender.release(tid)
            return self._report(entry, PrefillStatus.FAILED, f"refused: {e}")
        self.jobs[tid] = entry
        self._by_engine[tid] = entry
        self._set(entry, PrefillState.QUEUED)

    def abort(self, transfer_id: str, reason: str) -> None:
        entry = self.jobs.get(transfer_id)
        if entry is None:
            return
        self.engine.abort(entry.engine_id)
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
            entry = self._by_engine.get(item.request.request_id)
            if entry is not None:
                if not entry.stamps.prefill_start:
                    entry.stamps.prefill_start = time.time()
                if entry.state is PrefillState.QUEUED:
                    self._set(entry, PrefillState.PREFILLING)
                self._step_sends.append((entry, item, offset))
            offset += item.num_new_tokens
        return self._send_layer if self._step_sends else None

    def _send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Per-layer hook: `k`, `v` are `[step tokens, kv_heads, head_dim]` of this layer,
        freshly computed and never written again, so the sender may stage them later."""
        cache_k, cache_v = self.engine.kv_cache.layer(layer)
        for entry, item, offset in self._step_sends:
            if entry.state is PrefillState.HELD:
                continue  # no transfer to send to until a re-send order comes
            # the decode side holds [0, kv_start): neither sent nor gathered
            tid, lo = entry.order.transfer_id, max(entry.sent_upto, entry.order.kv_start)
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
            entry = self._by_engine.get(out.request_id)
            if entry is None:
                continue
            tid = entry.order.transfer_id
            if out.finish_reason is FinishReason.ERROR:  # the engine failed it, blocks freed
                self.sender.abort(tid, out.error)  # the decode side learns why
                self._settle(entry, PrefillStatus.FAILED, out.error)
                continue
            entry.num_cached_tokens = out.num_cached_tokens
            entry.stamps.prefill_end = time.time()
            entry.first_token_id = out.new_token_ids[0]
            if entry.state is PrefillState.HELD:
                entry.hold_until = time.monotonic() + self.hold_s
            else:
                self._finish_transfer(entry)

    def tick(self) -> None:
        self.sweep()
        now = time.monotonic()
        for tid, entry in list(self.jobs.items()):
            if entry.state is PrefillState.HELD:
                if (entry.hold_until is not None and now > entry.hold_until
                        and tid not in self._claims):
                    self.engine.abort(entry.engine_id)  # its outcome (HELD) went out already
                    self._forget(entry)
                continue
            result = self.sender.poll(tid)
            if result.status is TransferStatus.DONE:
                entry.stamps.kv_send_end = time.time()
                self.engine.abort(entry.engine_id)  # the decode side holds it all now
                self._settle(entry, PrefillStatus.DONE)
            elif result.status is TransferStatus.FAILED and entry.state is PrefillState.QUEUED:
                self.engine.abort(entry.engine_id)  # nothing computed: nothing worth keeping
                self._settle(entry, PrefillStatus.FAILED, f"KV transfer failed: {result.reason}")
            elif result.status is TransferStatus.FAILED:
                self._hold(entry, f"KV transfer failed: {result.reason}")
        self.publisher.flush()

    def idle_wait(self) -> float:
        return 0.001 if self.jobs else 0.1  # waiting for acks: notice them promptly

    def close(self) -> None:
        try:
            for tid, entry in list(self.jobs.items()):
                self.engine.abort(entry.engine_id)
                self.sender.abort(tid, "prefill worker closed")  # the decode side learns why
                self._settle(entry, PrefillStatus.FAILED, "prefill worker closed")
        finally:
            self.sender.close()
            self.publisher.close()

    # -- internals -------------------------------------------------------------------------

    def _set(self, entry: _Job, state: PrefillState) -> None:
        entry.state = state
        self.states[entry.order.transfer_id] = state

    def _finish_transfer(self, entry: _Job) -> None:
        note = Handoff(entry.num_cached_tokens, entry.stamps.prefill_start,
                       entry.stamps.prefill_end)
        self.sender.finish(entry.order.transfer_id, entry.first_token_id, note.encode())
        self._set(entry, PrefillState.TRANSFERRING)

    def _hold(self, entry: _Job, reason: str) -> None:
        """The job's transfer failed after its prefill began: keep the KV for a re-send."""
        self.sender.release(entry.order.transfer_id)
        self._set(entry, PrefillState.HELD)
        if entry.first_token_id is not None:
            entry.hold_until = time.monotonic() + self.hold_s
        self._report(entry, PrefillStatus.HELD, f"{reason}; the KV is held for a re-send")

    def _move(self, entry: _Job, order: PrefillOrder) -> None:
        """Re-send: the job goes on under `order`'s transfer (begun by the caller). What was
        computed leaves from the blocks now; the rest as it is computed."""
        old = entry.order.transfer_id
        self.sender.release(old)  # a live one is aborted: its receiver learns
        del self.jobs[old]
        self.states.pop(old, None)
        entry.order, entry.hold_until = order, None
        entry.stamps.kv_send_start = 0.0
        tid = order.transfer_id
        self.jobs[tid] = entry
        lo = order.kv_start  # the new decode worker's cached prefix is not sent
        if entry.sent_upto > lo:
            blocks = self.engine.kv_block_ids(entry.engine_id)
            entry.stamps.kv_send_start = time.time()
            for layer in range(self.engine.kv_cache.num_layers):
                cache_k, cache_v = self.engine.kv_cache.layer(layer)
                self.sender.send_layer(tid, layer, lo,
                                       gather_tokens(cache_k, blocks, lo, entry.sent_upto),
                                       gather_tokens(cache_v, blocks, lo, entry.sent_upto))
        if entry.first_token_id is not None:
            self._finish_transfer(entry)
        else:
            self._set(entry, PrefillState.PREFILLING if entry.stamps.prefill_start
                      else PrefillState.QUEUED)

    def _forget(self, entry: _Job) -> None:
        tid = entry.order.transfer_id
        self.sender.release(tid)
        del self.jobs[tid]
        self._by_engine.pop(entry.engine_id, None)
        self.states.pop(tid, None)

    def _settle(self, entry: _Job, status: PrefillStatus, reason: str = "") -> None:
        self._forget(entry)
        self._report(entry, status, reason)

    def _report(self, entry: _Job, status: PrefillStatus, reason: str) -> None:
        self.publisher.add_outcome(entry.order.notify_endpoint, PrefillOutcome(
            entry.order.transfer_id, status, reason, entry.num_cached_tokens, entry.stamps))
