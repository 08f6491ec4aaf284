"""The stream from workers to the router (DESIGN §2, step 5): tokens and prefill outcomes.

The router binds one ZMQ ROUTER socket and names it in every order (`stream_endpoint`,
`notify_endpoint`); a worker connects one DEALER socket per router endpoint and sends at
most one message per engine step and endpoint (one frame; the router takes a transfer's
items from one connection only, and with the cluster's CURVE keys only from the
cluster's workers). A message is the msgpack array
`[STREAM_VERSION, kind, worker_id, time, [item, ...]]`:
- TOKENS (decode and colocated workers): items are TokenChunks, every token the step
  produced for that router's jobs. A job's first chunk carries its stamps so far and how
  many prompt tokens a prefix cache served (so a request that a stop string ends early
  still has them) and the KV bytes it received from a prefill worker; its last chunk, the
  only one with a `finish`, carries them complete;
- PREFILL (prefill workers): items are PrefillOutcomes, one per job that ended.
`decode` rejects anything else with a ValueError, so a router and a worker that speak
different versions fail loudly instead of misreading.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgpack

from pdserve.protocol.orders import FinishReason, PrefillOutcome
from pdserve.protocol.stamps import DecodeStamps

STREAM_VERSION = 3


class MessageKind(enum.IntEnum):
    TOKENS = 1
    PREFILL = 2


@dataclass(frozen=True)
class TokenChunk:
    transfer_id: str
    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    error: str = ""  # why, when the finish is ERROR or ABORT
    stamps: DecodeStamps | None = None  # with the first and the final chunk
    num_cached_tokens: int = 0  # with the first and the final chunk
    # KV payload bytes received from the prefill worker (0 for a local prefill); with the
    # first and the final chunk
    kv_bytes: int = 0

    def to_wire(self) -> list:
        return [self.transfer_id, list(self.token_ids),
                self.finish.value if self.finish else None, self.error,
                self.stamps.to_wire() if self.stamps else None, self.num_cached_tokens,
                self.kv_bytes]

    @classmethod
    def from_wire(cls, item) -> TokenChunk:
        tid, tokens, finish, error, stamps, cached, kv_bytes = item
        return cls(str(tid), tuple(int(t) for t in tokens),
                   FinishReason(finish) if finish is not None else None, str(error),
                   DecodeStamps.from_wire(stamps) if stamps is not None else None, int(cached),
                   int(kv_bytes))


@dataclass(frozen=True)
class TokenBatch:
    worker_id: str
    time: float  # time.time() when the step's tokens were ready
    chunks: tuple[TokenChunk, ...]


@dataclass(frozen=True)
class PrefillReport:
    worker_id: str
    time: float
    outcomes: tuple[PrefillOutcome, ...]


StreamMessage = TokenBatch | PrefillReport


def encode(message: StreamMessage) -> bytes:
    if isinstance(message, TokenBatch):
        kind, items = MessageKind.TOKENS, message.chunks
    else:
        kind, items = MessageKind.PREFILL, message.outcomes
    return msgpack.packb([STREAM_VERSION, int(kind), message.worker_id, message.time,
                          [item.to_wire() for item in items]])


def decode(data: bytes) -> StreamMessage:
    """Raises ValueError for anything but a message of this version."""
    try:
        version, *rest = msgpack.unpackb(data)
    except Exception as e:  # noqa: BLE001 - any malformed message is one error
        raise ValueError(f"malformed stream message: {e}") from e
    if version != STREAM_VERSION:
        raise ValueError(f"stream version {version!r}, expected {STREAM_VERSION}")
    try:
        kind, worker_id, t, items = rest
        if MessageKind(kind) is MessageKind.TOKENS:
            return TokenBatch(str(worker_id), float(t),
                              tuple(TokenChunk.from_wire(i) for i in items))
        return PrefillReport(str(worker_id), float(t),
                             tuple(PrefillOutcome.from_wire(i) for i in items))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"malformed stream message: {e}") from e
