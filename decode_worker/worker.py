"""The decode worker: an engine in decode-only mode, a KV receiver and a token stream
(DESIGN §2, steps 2, 4-6).

Life of a disaggregated job, keyed by the router's `transfer_id`:
1. RESERVED   `reserve(order)` holds blocks for the prompt (the engine allocates them, in the
              caller's thread, without waiting for the step in progress) and expects its KV
              under a lease of `order.lease_s`; it returns this worker's KV endpoint for the
              prefill worker. No room: NoFreeBlocksError, nothing held.
2. RECEIVING  KV frames arrive and the receiver scatters them into the reserved blocks.
3. DECODING   once every layer, the first token and the hand-off note are in, the engine
              admits the request into the running batch; the first token is pushed at once,
              then each step's new tokens (one TokenBatch per step and router endpoint).
4. ENDED      the last chunk carries the finish (stop, length, abort, error), the stage
              stamps (the prefill worker's from the hand-off) and the prefix-cache hits; the
              engine has freed the blocks before it is pushed.
              Lease expiry, a failed transfer or `abort` end the job from state 1 or 2
              with the receiver's transfer released and the blocks freed.
A local job (`generate`: a prompt too short to send away) goes QUEUED -> PREFILLING ->
DECODING -> ENDED in this engine.

Threading: the public methods are thread-safe and never wait for a step; the job table,
the receiver's bookkeeping and the stream sockets live on the loop's thread.
"""

from __future__ import annotations

import time

from pdserve.decode_worker.jobs import DecodeJobs
from pdserve.engine import Engine
from pdserve.kvtransfer.transports import make_receiver
from pdserve.protocol import DecodeOrder, WorkerRole
from pdserve.worker.base import Worker, publisher_for
from pdserve.worker.config import WorkerConfig


def decode_jobs(config: WorkerConfig, engine: Engine) -> DecodeJobs:
    """The decode role's job table on `engine`, with its KV receiver (into its cache)."""
    cache = engine.kv_cache
    receiver = make_receiver(config.transport, config.kv_spec, cache.k, cache.v,
                             f"tcp://{config.kv_host}:*", curve=config.curve)
    return DecodeJobs(engine, receiver, publisher_for(config))


def colocated_jobs(config: WorkerConfig, engine: Engine) -> DecodeJobs:
    """The colocated role's job table on `engine`: every job is local, nothing received."""
    return DecodeJobs(engine, None, publisher_for(config))


class DecodeWorker(Worker):
    role = WorkerRole.DECODE

    def __init__(self, config: WorkerConfig):
        super().__init__(config, {WorkerRole.DECODE: decode_jobs})

    @property
    def _receiver(self):
        return self._jobs.receiver

    def kv_endpoint(self) -> str:
        return self._receiver.endpoint

    def reserve(self, order: DecodeOrder) -> str:
        """Hold blocks for the order's prompt KV under its lease; this worker's KV endpoint.
        Raises NoFreeBlocksError (no room now), ValueError (a bad order) or RuntimeError
        (closed), holding nothing."""
        self._check_open()
        received = time.time()
        tid = order.transfer_id
        blocks = self.engine.reserve(tid, order.prompt_token_ids, order.sampling)
        try:
            self._receiver.expect(tid, blocks, len(order.prompt_token_ids), order.lease_s)
            self._apply(lambda: self._jobs.add_reserved(order, received))
        except BaseException:
            self._loop.post(lambda: self.engine.abort(tid))
            raise
        return self._receiver.endpoint

    def generate(self, order: DecodeOrder) -> None:
        """Prefill the order's prompt here and decode it (no KV transfer); returns at once.
        Raises ValueError (a bad order) or RuntimeError (closed), holding nothing."""
        self.engine.validate(order.prompt_token_ids, order.sampling)
        received = time.time()
        self._apply(lambda: self._jobs.add_local(order, received))
