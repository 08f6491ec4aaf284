"""The prefill worker: an engine in prefill-only mode and a KV sender (DESIGN §2, step 3-4).

Life of a job, keyed by the router's `transfer_id`:
1. RECEIVED      `submit(job)` hands it to the engine loop and returns a Future of its
                 PrefillResult; a bad job (token ids, length, duplicate id) fails the Future
                 with ValueError and leaves nothing behind.
2. QUEUED        the loop adds it to the engine and opens the transfer (`sender.begin`), so
                 the handshake with the decode worker runs while the job waits.
3. PREFILLING    the engine runs its chunks under the step's token budget. Before each step
                 a per-layer hook is armed: as soon as layer L is computed, its K/V for the
                 job's tokens go to the sender (which copies them) while layer L+1 computes.
                 Tokens served by the prefix cache are sent from the cache with the first
                 chunk; a range already sent is never sent again (preemption recomputes).
4. TRANSFERRING  the step that computes the last prompt token samples the first token; the
                 engine frees the job's blocks at once (full ones stay in its prefix cache)
                 and `sender.finish` carries the first token to the decode worker.
5. DONE          the receiver acknowledged every layer: the Future resolves with the first
                 token and the stage stamps; the transfer is released.
   FAILED        the sender reports FAILED in any state (receiver gone, handshake refused,
                 no ack within `ack_timeout_s`): the engine drops the job, the result says why.
   ABORTED       `abort(transfer_id)` before a terminal state: the engine drops the job and
                 the receiver is told.
In every terminal state the job holds no engine block and no open transfer.

Threading: the public methods are thread-safe and never wait for a step; the engine, the
job table and the sender's per-step calls live on the engine loop's thread (engine.loop).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pdserve.engine import Engine, EngineConfig, EngineMode
from pdserve.engine.loop import EngineLoop, LoadReport, LoopHandler
from pdserve.engine.scheduler import RequestOutput, ScheduledBatch, ScheduledRequest
from pdserve.kvtransfer.base import KVSender, KVSpec, TransferStatus
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.transports import TransportKind, make_sender
from pdserve.prefill_worker.job import PrefillJob, PrefillResult, PrefillStamps, PrefillState


@dataclass(frozen=True)
class PrefillWorkerConfig:
    engine: EngineConfig  # scheduler mode must be PREFILL_ONLY
    transport: TransportKind = TransportKind.ZMQ
    handshake_timeout_s: float = 5.0
    ack_timeout_s: float = 10.0  # after the first token: a receiver that never acks is gone
    worker_id: str = "prefill-0"

    def __post_init__(self) -> None:
        if self.engine.scheduler.mode is not EngineMode.PREFILL_ONLY:
            raise ValueError("a prefill worker needs an engine in prefill-only mode, got "
                             f"{self.engine.scheduler.mode.value}")


class PrefillWorker:
    def __init__(self, config: PrefillWorkerConfig):
        self.config = config
        self.engine = Engine(config.engine)
        m = config.engine.model
        self.kv_spec = KVSpec(Path(m.path).name, m.num_layers, m.num_kv_heads, m.head_dim,
                              config.engine.torch_dtype)
        sender = make_sender(config.transport, self.kv_spec, device=config.engine.device,
                             handshake_timeout_s=config.handshake_timeout_s,
                             ack_timeout_s=config.ack_timeout_s)
        self._jobs = _PrefillJobs(self.engine, sender)
        self._loop = EngineLoop(self.engine, self._jobs, name=f"{config.worker_id}-loop")

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def submit(self, job: PrefillJob) -> Future[PrefillResult]:
        """Queue a job; the Future resolves once it is DONE, FAILED or ABORTED."""
        result: Future[PrefillResult] = Future()
        added = self._loop.call(lambda: self._jobs.add(job, result))
        added.add_done_callback(lambda f: _forward_error(f, result))
        return result

    def prefill(self, job: PrefillJob, timeout: float | None = None) -> PrefillResult:
        """`submit` and wait: for callers that hold a thread per job (RPC servers)."""
        return self.submit(job).result(timeout)

    def abort(self, transfer_id: str) -> None:
        """Abort a job in any live state; idempotent, unknown ids are ignored."""
        self._loop.post(lambda: self._jobs.abort(transfer_id, "aborted by the router"))

    def job_state(self, transfer_id: str) -> PrefillState | None:
        """The live job's state, or None once it ended (or was never seen)."""
        return self._jobs.states.get(transfer_id)

    def load(self) -> LoadReport:
        return self._loop.load()

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        """Block hashes that entered and left this worker's prefix cache since the last call
        (the first call returns every cached block): what the cluster's prefix index keeps."""
        return self._loop.drain_prefix_events()

    def close(self) -> None:
        """Fail live jobs, close the sender, stop the loop; idempotent."""
        self._loop.close()


def _forward_error(added: Future, result: Future) -> None:
    if added.exception() is not None and not result.done():
        result.set_exception(added.exception())


@dataclass
class _Job:
    job: PrefillJob
    result: Future[PrefillResult]
    state: PrefillState = PrefillState.QUEUED
    sent_upto: int = 0  # KV of positions [0, sent_upto) went out for every layer
    first_token_id: int | None = None
    num_cached_tokens: int = 0
    stamps: PrefillStamps = field(default_factory=PrefillStamps)


class _PrefillJobs(LoopHandler):
    """The job table; every method runs on the engine loop's thread."""

    def __init__(self, engine: Engine, sender: KVSender):
        self.engine = engine
        self.sender = sender
        self.jobs: dict[str, _Job] = {}
        self.states: dict[str, PrefillState] = {}  # published copy for other threads
        self._step_sends: list[tuple[_Job, ScheduledRequest, int]] = []

    def add(self, job: PrefillJob, result: Future[PrefillResult]) -> None:
        now = time.time()
        tid = job.transfer_id
        self.engine.add_request(tid, job.prompt_token_ids, job.params)  # ValueError: nothing held
        try:
            self.sender.begin(tid, job.kv_endpoint, len(job.prompt_token_ids))
        except Exception:
            self.engine.abort(tid)
            raise
        entry = _Job(job, result)
        entry.stamps.received = entry.stamps.prefill_queued = now
        self._set(tid, entry, PrefillState.QUEUED)

    def abort(self, transfer_id: str, reason: str) -> None:
        entry = self.jobs.get(transfer_id)
        if entry is None:
            return
        self.engine.abort(transfer_id)
        self.sender.abort(transfer_id, reason)
        self._settle(entry, PrefillState.ABORTED, reason)

    # -- LoopHandler -----------------------------------------------------------------------

    def before_step(self, batch: ScheduledBatch):
        self._step_sends = []
        offset = 0  # where each item's tokens start in the step's flat token order
        for item in batch.requests:
            entry = self.jobs.get(item.request.request_id)
            if entry is not None:
                if entry.state is PrefillState.QUEUED:
                    entry.stamps.prefill_start = time.time()
                    self._set(entry.job.transfer_id, entry, PrefillState.PREFILLING)
                self._step_sends.append((entry, item, offset))
            offset += item.num_new_tokens
        return self._send_layer if self._step_sends else None

    def _send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Per-layer hook: `k`, `v` are `[step tokens, kv_heads, head_dim]` of this layer."""
        cache_k, cache_v = self.engine.kv_cache.layer(layer)
        for entry, item, offset in self._step_sends:
            tid, lo = entry.job.transfer_id, entry.sent_upto
            if not entry.stamps.kv_send_start:
                entry.stamps.kv_send_start = time.time()
            if item.start > lo:  # prefix-cache hit: those tokens were never computed here
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
            entry.first_token_id = out.new_token_ids[0]
            entry.num_cached_tokens = out.num_cached_tokens
            entry.stamps.prefill_end = time.time()
            self.sender.finish(out.request_id, entry.first_token_id)
            self._set(out.request_id, entry, PrefillState.TRANSFERRING)

    def tick(self) -> None:
        for tid, entry in list(self.jobs.items()):
            result = self.sender.poll(tid)
            if result.status is TransferStatus.DONE:
                entry.stamps.kv_send_end = time.time()
                self._settle(entry, PrefillState.DONE)
            elif result.status is TransferStatus.FAILED:
                self.engine.abort(tid)
                self._settle(entry, PrefillState.FAILED, f"KV transfer failed: {result.reason}")

    def idle_wait(self) -> float:
        return 0.001 if self.jobs else 0.1  # waiting for acks: notice them promptly

    def num_jobs(self) -> int:
        return len(self.jobs)

    def close(self) -> None:
        for tid, entry in list(self.jobs.items()):
            self.engine.abort(tid)
            self.sender.abort(tid, "prefill worker closed")  # the decode side learns why
            self._settle(entry, PrefillState.FAILED, "prefill worker closed")
        self.sender.close()

    # -- internals -------------------------------------------------------------------------

    def _set(self, tid: str, entry: _Job, state: PrefillState) -> None:
        entry.state = state
        self.jobs[tid] = entry
        self.states[tid] = state

    def _settle(self, entry: _Job, state: PrefillState, reason: str = "") -> None:
        tid = entry.job.transfer_id
        self.sender.release(tid)
        del self.jobs[tid]
        self.states.pop(tid, None)
        entry.state = state
        if not entry.result.done():
            entry.result.set_result(PrefillResult(
                tid, state, entry.first_token_id if state is PrefillState.DONE else None,
                reason, entry.num_cached_tokens, entry.stamps))
