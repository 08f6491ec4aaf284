"""The token stream from a decode or colocated worker to the router (DESIGN §2, step 5).

Wire: the router binds a ZMQ PULL socket and names it in each job (`stream_endpoint`); the
worker connects one PUSH socket per router endpoint and sends one message per engine step
and endpoint: every token that step produced for that router's jobs. A message is the
msgpack array `[STREAM_VERSION, worker_id, time, [chunk, ...]]` and a chunk
`[transfer_id, [token ids], finish, error, stamps]`; `finish` is a StreamFinish value or
nil, and the job's last chunk (the only one with a finish) carries its stage stamps.
`TokenBatch.decode` rejects anything else with a ValueError, so a router that speaks
another version fails loudly instead of misreading.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

import msgpack
import zmq
from pdserve.decode_worker.job import DecodeStamps

STREAM_VERSION = 1
log = logging.getLogger(__name__)


class StreamFinish(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the model's length
    ABORT = "abort"  # the router aborted the job
    ERROR = "error"  # the job failed here (KV never arrived, lease expired, worker closing)


@dataclass(frozen=True)
class TokenChunk:
    transfer_id: str
    token_ids: tuple[int, ...]
    finish: StreamFinish | None = None
    error: str = ""
    stamps: DecodeStamps | None = None  # with the final chunk only

    def to_wire(self) -> list:
        return [self.transfer_id, list(self.token_ids),
                self.finish.value if self.finish else None, self.error,
                self.stamps.to_wire() if self.stamps else None]


@dataclass(frozen=True)
class TokenBatch:
    worker_id: str
    time: float  # time.time() when the step's tokens were ready
    chunks: tuple[TokenChunk, ...]

    def encode(self) -> bytes:
        return msgpack.packb([STREAM_VERSION, self.worker_id, self.time,
                              [c.to_wire() for c in self.chunks]])

    @classmethod
    def decode(cls, data: bytes) -> TokenBatch:
        try:
            message = msgpack.unpackb(data)
            version = message[0]
        except Exception as e:  # noqa: BLE001 - any malformed message is one error
            raise ValueError(f"malformed token stream message: {e}") from e
        if version != STREAM_VERSION:
            raise ValueError(f"token stream version {version!r}, expected {STREAM_VERSION}")
        try:
            _, worker_id, t, raw_chunks = message
            chunks = tuple(
                TokenChunk(str(tid), tuple(int(x) for x in tokens),
                           StreamFinish(finish) if finish is not None else None, str(error),
                           DecodeStamps.from_wire(stamps) if stamps is not None else None)
                for tid, tokens, finish, error, stamps in raw_chunks)
            return cls(str(worker_id), float(t), chunks)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"malformed token stream message: {e}") from e


class TokenPublisher:
    """Collects a step's chunks per router endpoint and sends them as one TokenBatch each.

    Used by the engine loop's thread alone (ZMQ sockets are not thread-safe). Sends never
    block: a router that stopped reading for `max_queued` messages loses later ones (its
    requests are aborted by then), counted in `num_dropped`.
    """

    def __init__(self, worker_id: str, max_queued: int = 100_000):
        self.worker_id = worker_id
        self._ctx = zmq.Context.instance()
        self._max_queued = max_queued
        self._sockets: dict[str, zmq.Socket] = {}
        self._pending: dict[str, list[TokenChunk]] = {}
        self.num_dropped = 0

    def add(self, endpoint: str, chunk: TokenChunk) -> None:
        self._pending.setdefault(endpoint, []).append(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        now = time.time()
        for endpoint, chunks in self._pending.items():
            message = TokenBatch(self.worker_id, now, tuple(chunks)).encode()
            try:
                self._socket(endpoint).send(message, zmq.NOBLOCK)
            except zmq.Again:
                self.num_dropped += 1
                log.warning("token stream to %s is full; dropped %d chunks", endpoint,
                            len(chunks))
        self._pending.clear()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=1000)  # let the last tokens (final chunks) leave
        self._sockets.clear()

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, self._max_queued)
            sock.connect(endpoint)
            self._sockets[endpoint] = sock
        return sock
