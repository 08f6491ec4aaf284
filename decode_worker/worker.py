"""The decode worker: an engine in decode-only mode, a KV receiver and a token stream
(DESIGN §2, steps 2, 4-6); and the colocated worker, which prefills locally.

Life of a disaggregated job, keyed by the router's `transfer_id`:
1. RESERVED   `reserve(job)` holds blocks for the prompt (the engine allocates them) and
              expects its KV under a lease of `job.lease_s`; it returns this worker's KV
              endpoint for the prefill worker. No room: NoFreeBlocksError, nothing held.
2. RECEIVING  KV frames arrive and the receiver scatters them into the reserved blocks.
3. DECODING   once every layer and the first token are in, the engine admits the request
              into the running batch; the first token is pushed at once, then each step's
              new tokens (one TokenBatch per step and router endpoint).
4. ENDED      the last chunk carries the finish (stop, length, abort, error) and the stage
              stamps; the engine has freed the blocks before it is pushed.
              Lease expiry, a failed transfer or `abort` end the job from state 1 or 2
              with the receiver's transfer released and the blocks freed.
A local job (`generate`, the colocated path) goes QUEUED -> PREFILLING -> DECODING -> ENDED
in one engine.

Threading: the public methods are thread-safe. `reserve` and `generate` wait for the engine
loop to apply them between two steps (so their errors reach the caller); `abort` does not
wait. The engine, receiver bookkeeping and stream sockets live on the loop's thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdserve.decode_worker.job import DecodeJob, DecodeState
from pdserve.decode_worker.jobs import DecodeJobs
from pdserve.decode_worker.stream import TokenPublisher
from pdserve.engine import Engine, EngineConfig, EngineMode
from pdserve.engine.loop import EngineLoop, LoadReport
from pdserve.kvtransfer.base import KVSpec
from pdserve.kvtransfer.transports import TransportKind, make_receiver

# reserve/generate wait at most this long for the loop; a longer step means a broken engine
_CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DecodeWorkerConfig:
    """`engine` in DECODE_ONLY mode for a decode worker, MIXED for a colocated one."""

    engine: EngineConfig
    transport: TransportKind = TransportKind.ZMQ
    kv_host: str = "127.0.0.1"  # the receiver binds here and advertises it: must be routable
    worker_id: str = "decode-0"


class DecodeWorker:
    MODE = EngineMode.DECODE_ONLY

    def __init__(self, config: DecodeWorkerConfig):
        if config.engine.scheduler.mode is not self.MODE:
            raise ValueError(f"{type(self).__name__} needs an engine in {self.MODE.value} mode, "
                             f"got {config.engine.scheduler.mode.value}")
        self.config = config
        self.engine = Engine(config.engine)
        m = config.engine.model
        self.kv_spec = KVSpec(Path(m.path).name, m.num_layers, m.num_kv_heads, m.head_dim,
                              config.engine.torch_dtype)
        receiver = self._make_receiver()
        self._kv_endpoint = receiver.endpoint if receiver else ""
        self._jobs = DecodeJobs(self.engine, receiver, TokenPublisher(config.worker_id))
        self._loop = EngineLoop(self.engine, self._jobs, name=f"{config.worker_id}-loop")

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    def reserve(self, job: DecodeJob) -> str:
        """Hold blocks for `job`'s prompt KV under its lease; this worker's KV endpoint."""
        self._loop.call(lambda: self._jobs.reserve(job)).result(_CALL_TIMEOUT_S)
        return self._kv_endpoint

    def kv_endpoint(self) -> str:
        """Where prefill workers send KV to this worker ("" for a colocated one)."""
        return self._kv_endpoint

    def generate(self, job: DecodeJob) -> None:
        """Prefill `job`'s prompt here and decode it (no KV transfer)."""
        self._loop.call(lambda: self._jobs.generate(job)).result(_CALL_TIMEOUT_S)

    def abort(self, transfer_id: str) -> None:
        """End a job in any state; its last chunk says ABORT. Idempotent."""
        self._loop.post(lambda: self._jobs.abort(transfer_id, "aborted by the router"))

    def job_state(self, transfer_id: str) -> DecodeState | None:
        return self._jobs.states.get(transfer_id)

    def load(self) -> LoadReport:
        return self._loop.load()

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        """As PrefillWorker.drain_prefix_events, for this worker's prefix cache."""
        return self._loop.drain_prefix_events()

    def close(self) -> None:
        """End every job with an error chunk, close the receiver and the stream; idempotent."""
        self._loop.close()

    def _make_receiver(self):
        cache = self.engine.kv_cache
        return make_receiver(self.config.transport, self.kv_spec, cache.k, cache.v,
                             f"tcp://{self.config.kv_host}:*")


class ColocatedWorker(DecodeWorker):
    """Prefill and decode in one engine (mixed mode, chunked prefill): the baseline. Same
    job interface and token stream; there is no KV to receive, so no `reserve`."""

    MODE = EngineMode.MIXED

    def reserve(self, job: DecodeJob) -> str:
        raise ValueError("a colocated worker prefills locally: use generate()")

    def _make_receiver(self):
        return None
