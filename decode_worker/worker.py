"""The decode worker: an engine in decode-only mode, a KV receiver and a token stream
(DESIGN §2, steps 2, 4-6).

Life of a disaggregated job, keyed by the router's `transfer_id`:
1. RESERVED   `reserve(order)` holds blocks for the prompt (the engine takes them, in the
              caller's thread, without waiting for the step in progress: a reference on
              each block of the prompt's longest cached prefix, fresh blocks for the rest)
              and expects the KV of the rest under a lease of `order.lease_s`; it returns a
              Reservation: this worker's KV endpoint and how many leading tokens it holds
              already, which the prefill worker then does not send. No room:
              NoFreeBlocksError, nothing held.
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

Ownership at the seams: the engine owns every block, cached prefix ones included, from
`reserve` to the job's end and frees them all then (the cached ones stay in its prefix
cache, one reference fewer); the receiver is lent only the fresh blocks, for the transfer.

Threading: the public methods are thread-safe and never wait for a step; the job table,
the receiver's bookkeeping and the stream sockets live on the loop's thread.
"""

from __future__ import annotations

import time

from pdserve.decode_worker.jobs import DecodeJobs
from pdserve.engine import Engine
from pdserve.kvtransfer.transports import make_receiver
from pdserve.protocol import DecodeOrder, Reservation, WorkerRole
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

    def reserve(self, order: DecodeOrder) -> Reservation:
        """Hold blocks for the order's prompt KV under its lease: the prompt's cached prefix
        (whole blocks, referenced now, so it cannot be evicted before the job ends) and
        fresh ones for the rest. Where to send the KV and from which position on.
        Raises NoFreeBlocksError (no room now), ValueError (a bad order) or RuntimeError
        (closed), holding nothing."""
        self._check_open()
        received = time.time()
        tid = order.transfer_id
        held = self.engine.reserve(tid, order.prompt_token_ids, order.sampling)
        try:
            self._receiver.expect(tid, held.fresh_block_ids, len(order.prompt_token_ids),
                                  order.lease_s, held.num_cached_tokens)
            self._apply(lambda: self._jobs.add_reserved(order, received))
        except BaseException:
            self._loop.post(lambda: self.engine.abort(tid))
            raise
        return Reservation(self._receiver.endpoint, held.num_cached_tokens)

    def generate(self, order: DecodeOrder) -> None:
        """Prefill the order's prompt here and decode it (no KV transfer); returns at once.
        Raises ValueError (a bad order) or RuntimeError (closed), holding nothing."""
        self.engine.validate(order.prompt_token_ids, order.sampling)
        received = time.time()
        self._apply(lambda: self._jobs.add_local(order, received))
