"""The job table of a decode or colocated worker; every method runs on the engine loop's
thread (see decode_worker.worker for a job's life).

Ownership: the engine owns every KV block. A reserved job's blocks are lent to the KV
receiver from `expect` until the transfer is DONE or FAILED, or the job is aborted (the
receiver's transfer is released first, so it stops writing before the engine frees them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.decode_worker.job import DecodeJob, DecodeStamps, DecodeState
from pdserve.decode_worker.stream import StreamFinish, TokenChunk, TokenPublisher
from pdserve.engine import Engine, FinishReason
from pdserve.engine.loop import LoopHandler
from pdserve.engine.scheduler import RequestOutput, ScheduledBatch
from pdserve.kvtransfer.base import KVReceiver, TransferStatus

_FINISH = {FinishReason.STOP: StreamFinish.STOP, FinishReason.LENGTH: StreamFinish.LENGTH,
           FinishReason.ABORT: StreamFinish.ABORT}
_AWAITING_KV = (DecodeState.RESERVED, DecodeState.RECEIVING)


@dataclass
class _Job:
    job: DecodeJob
    state: DecodeState
    local_prefill: bool
    stamps: DecodeStamps = field(default_factory=DecodeStamps)


class DecodeJobs(LoopHandler):
    def __init__(self, engine: Engine, receiver: KVReceiver | None, publisher: TokenPublisher):
        self.engine = engine
        self.receiver = receiver
        self.publisher = publisher
        self.jobs: dict[str, _Job] = {}
        self.states: dict[str, DecodeState] = {}  # published copy for other threads

    def reserve(self, job: DecodeJob) -> None:
        """Hold blocks for the prompt and expect its KV. Raises NoFreeBlocksError or
        ValueError with nothing held."""
        assert self.receiver is not None
        tid = job.transfer_id
        blocks = self.engine.reserve(tid, job.prompt_token_ids, job.params)
        try:
            self.receiver.expect(tid, blocks, len(job.prompt_token_ids), job.lease_s)
        except Exception:
            self.engine.abort(tid)
            raise
        self._add(job, DecodeState.RESERVED, local_prefill=False)

    def generate(self, job: DecodeJob) -> None:
        """Prefill the prompt here, then decode. Raises ValueError with nothing held."""
        self.engine.add_request(job.transfer_id, job.prompt_token_ids, job.params)
        self._add(job, DecodeState.QUEUED, local_prefill=True)

    def abort(self, transfer_id: str, reason: str) -> None:
        entry = self.jobs.get(transfer_id)
        if entry is None:
            return
        self._release_transfer(entry)
        self.engine.abort(transfer_id)
        self._end(entry, StreamFinish.ABORT, reason)
        self.publisher.flush()

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
        if self.receiver is None:
            return
        for tid, entry in list(self.jobs.items()):
            if entry.state not in _AWAITING_KV:
                continue
            result = self.receiver.poll(tid)
            if result.status is TransferStatus.TRANSFERRING:
                self._set(entry, DecodeState.RECEIVING)
            elif result.status is TransferStatus.DONE:
                entry.stamps.kv_received = time.time()
                self.receiver.release(tid)
                out = self.engine.admit_prefilled(tid, result.first_token_id)
                entry.stamps.decode_admitted = time.time()
                self._emit(entry, out)
            elif result.status is TransferStatus.FAILED:
                self.receiver.release(tid)
                self.engine.abort(tid)
                self._end(entry, StreamFinish.ERROR, f"KV transfer failed: {result.reason}")
        self.publisher.flush()

    def idle_wait(self) -> float:
        waiting_for_kv = any(e.state in _AWAITING_KV for e in self.jobs.values())
        return 0.001 if waiting_for_kv else 0.1  # admit promptly once the KV is in

    def num_jobs(self) -> int:
        return len(self.jobs)

    def close(self) -> None:
        try:
            for tid, entry in list(self.jobs.items()):
                self._release_transfer(entry)
                self.engine.abort(tid)
                self._end(entry, StreamFinish.ERROR, "decode worker closed")
            self.publisher.flush()
        finally:
            if self.receiver is not None:
                self.receiver.close()
            self.publisher.close()

    # -- internals -------------------------------------------------------------------------

    def _add(self, job: DecodeJob, state: DecodeState, local_prefill: bool) -> None:
        entry = _Job(job, state, local_prefill)
        entry.stamps.received = time.time()
        self.jobs[job.transfer_id] = entry
        self.states[job.transfer_id] = state

    def _set(self, entry: _Job, state: DecodeState) -> None:
        entry.state = state
        self.states[entry.job.transfer_id] = state

    def _release_transfer(self, entry: _Job) -> None:
        if entry.state in _AWAITING_KV and self.receiver is not None:
            self.receiver.release(entry.job.transfer_id)

    def _emit(self, entry: _Job, out: RequestOutput) -> None:
        now = time.time()
        if not entry.stamps.first_token:
            entry.stamps.first_token = now
            if entry.local_prefill:
                entry.stamps.prefill_end = now
        self._set(entry, DecodeState.DECODING)
        if out.finished:
            self._end(entry, _FINISH[out.finish_reason], "", out.new_token_ids)
        else:
            self.publisher.add(entry.job.stream_endpoint,
                               TokenChunk(entry.job.transfer_id, out.new_token_ids))

    def _end(self, entry: _Job, finish: StreamFinish, error: str,
             token_ids: tuple[int, ...] = ()) -> None:
        tid = entry.job.transfer_id
        entry.stamps.finished = time.time()
        del self.jobs[tid]
        self.states.pop(tid, None)
        self.publisher.add(entry.job.stream_endpoint,
                           TokenChunk(tid, token_ids, finish, error, entry.stamps))
