"""The job table of a decode or colocated worker; every method runs on the engine loop's
thread (a job's life opens decode_worker/worker.py).

Ownership: the engine owns every KV block. A reserved job's fresh blocks are lent to the KV
receiver from `expect` until the transfer is DONE or FAILED, or the job is aborted (the
receiver's transfer is released first, so it stops writing before the engine frees them);
its cached prefix blocks are never lent, and the engine drops its references on them
wherever the job ends, as it frees the fresh ones.
Every job ends with exactly one final chunk (finish, stamps) to its router.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

from pdserve.engine import Engine, RequestOutput, ScheduledBatch
from pdserve.kvtransfer.base import KVReceiver, TransferStatus
from pdserve.protocol import DecodeOrder, DecodeStamps, FinishReason, Handoff, TokenChunk
from pdserve.worker.base import JobTable
from pdserve.worker.publisher import StreamPublisher


class DecodeState(enum.Enum):
    RESERVED = "reserved"  # blocks held under a lease, no KV arrived yet
    RECEIVING = "receiving"  # KV frames arriving into the reserved blocks
    QUEUED = "queued"  # local prefill: waiting in the engine
    PREFILLING = "prefilling"  # local prefill: chunks computing
    DECODING = "decoding"  # in the running batch, one token per step


_AWAITING_KV = (DecodeState.RESERVED, DecodeState.RECEIVING)


@dataclass
class _Job:
    order: DecodeOrder
    state: DecodeState
    stamps: DecodeStamps = field(default_factory=DecodeStamps)
    num_cached_tokens: int = 0
    kv_bytes: int = 0  # what the receiver took for it (disaggregated)


class DecodeJobs(JobTable):
    LEASED = frozenset(_AWAITING_KV)
    """`receiver` is None on a colocated worker, which prefills every job itself."""

    def __init__(self, engine: Engine, receiver: KVReceiver | None, publisher: StreamPublisher):
        super().__init__(engine, publisher)
        self.receiver = receiver
        self.jobs: dict[str, _Job] = {}

    def add_reserved(self, order: DecodeOrder, received: float) -> None:
        """Track a reservation the worker made (engine blocks, receiver's `expect`)."""
        self._add(order, DecodeState.RESERVED, received)

    def add_local(self, order: DecodeOrder, received: float) -> None:
        """Prefill the prompt here, then decode."""
        entry = self._add(order, DecodeState.QUEUED, received)
        try:
            self.engine.add_request(order.transfer_id, order.prompt_token_ids, order.sampling)
        except ValueError as e:  # e.g. a transfer id already live here: nothing is held
            self._end(entry, FinishReason.ERROR, f"refused: {e}")
            self.publisher.flush()

    def abort(self, transfer_id: str, reason: str) -> None:
        entry = self.jobs.get(transfer_id)
        if entry is None:
            return
        self._release_transfer(entry)
        self.engine.abort(transfer_id)
        self._end(entry, FinishReason.ABORT, reason)
        self.publisher.flush()

    def router_endpoint(self, entry: _Job) -> str:
        return entry.order.stream_endpoint

    # -- LoopHandler -----------------------------------------------------------------------

    def before_step(self, batch: ScheduledBatch):
        for item in batch.requests:
            entry = self.jobs.get(item.request.request_id)
            if entry is not None and entry.state is DecodeState.QUEUED:
                entry.stamps.prefill_start = time.time()
                self._set(entry, DecodeState.PREFILLING)
        return None

    def after_step(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if (entry := self.jobs.get(out.request_id)) is not None:
                self._emit(entry, out)
        self.publisher.flush()

    def tick(self) -> None:
        self.sweep()
        if self.receiver is not None:
            for entry in [e for e in self.jobs.values() if e.state in _AWAITING_KV]:
                self._poll_transfer(entry)
        self.publisher.flush()

    def idle_wait(self) -> float:
        waiting_for_kv = any(e.state in _AWAITING_KV for e in self.jobs.values())
        return 0.001 if waiting_for_kv else 0.1  # admit promptly once the KV is in

    def close(self) -> None:
        try:
            for tid, entry in list(self.jobs.items()):
                self._release_transfer(entry)
                self.engine.abort(tid)
                self._end(entry, FinishReason.ERROR, "decode worker closed")
        finally:
            if self.receiver is not None:
                self.receiver.close()
            self.publisher.close()

    # -- internals -------------------------------------------------------------------------

    def _poll_transfer(self, entry: _Job) -> None:
        tid = entry.order.transfer_id
        result = self.receiver.poll(tid)
        if result.status is TransferStatus.TRANSFERRING:
            self._set(entry, DecodeState.RECEIVING)
        elif result.status is TransferStatus.DONE:
            entry.stamps.kv_received = time.time()
            entry.kv_bytes = result.num_bytes
            self.receiver.release(tid)
            try:
                note = Handoff.decode(result.note)
            except ValueError as e:
                self.engine.abort(tid)
                return self._end(entry, FinishReason.ERROR, f"KV transfer: {e}")
            entry.num_cached_tokens = note.num_cached_tokens
            entry.stamps.prefill_start = note.prefill_start
            entry.stamps.prefill_end = note.prefill_end
            out = self.engine.admit_prefilled(tid, result.first_token_id)
            entry.stamps.decode_admitted = time.time()
            self._emit(entry, out)
        elif result.status is TransferStatus.FAILED:
            self.receiver.release(tid)
            self.engine.abort(tid)
            self._end(entry, FinishReason.ERROR, f"KV transfer failed: {result.reason}")

    def _add(self, order: DecodeOrder, state: DecodeState, received: float) -> _Job:
        entry = _Job(order, state, DecodeStamps(received=received))
        self.jobs[order.transfer_id] = entry
        self.states[order.transfer_id] = state
        return entry

    def _set(self, entry: _Job, state: DecodeState) -> None:
        entry.state = state
        self.states[entry.order.transfer_id] = state

    def _release_transfer(self, entry: _Job) -> None:
        if entry.state in _AWAITING_KV and self.receiver is not None:
            self.receiver.release(entry.order.transfer_id)

    def _emit(self, entry: _Job, out: RequestOutput) -> None:
        if out.finish_reason is FinishReason.ERROR:  # the engine failed it and freed its blocks
            return self._end(entry, FinishReason.ERROR, out.error)
        now = time.time()
        if not entry.stamps.first_token:
            entry.stamps.first_token = now
            if entry.state is DecodeState.PREFILLING:  # a local prefill ends with its token
                entry.stamps.prefill_end = now
                entry.num_cached_tokens = out.num_cached_tokens
        first = entry.state is not DecodeState.DECODING
        self._set(entry, DecodeState.DECODING)
        if out.finished:
            self._end(entry, out.finish_reason, "", out.new_token_ids)
        elif first:  # the stamps so far, for a request a stop string ends before the last
            self.publisher.add_chunk(entry.order.stream_endpoint, TokenChunk(
                entry.order.transfer_id, out.new_token_ids, stamps=replace(entry.stamps),
                num_cached_tokens=entry.num_cached_tokens, kv_bytes=entry.kv_bytes))
        else:
            self.publisher.add_chunk(entry.order.stream_endpoint,
                                     TokenChunk(entry.order.transfer_id, out.new_token_ids))

    def _end(self, entry: _Job, finish: FinishReason, error: str,
             token_ids: tuple[int, ...] = ()) -> None:
        tid = entry.order.transfer_id
        entry.stamps.finished = time.time()
        del self.jobs[tid]
        self.states.pop(tid, None)
        self.publisher.add_chunk(entry.order.stream_endpoint, TokenChunk(
            tid, token_ids, finish, error, entry.stamps, entry.num_cached_tokens,
            entry.kv_bytes))
