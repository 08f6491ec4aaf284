"""When each stage of a request happened, as the workers saw it (time.time(), one clock
across the cluster's machines as far as NTP allows; 0.0 where a stage never happened), and
the hand-off note a prefill worker sends its decode worker with the first token."""

from __future__ import annotations

from dataclasses import astuple, dataclass

import msgpack


@dataclass
class PrefillStamps:
    """On the prefill worker."""

    received: float = 0.0  # the order reached the worker
    prefill_start: float = 0.0  # first chunk scheduled
    prefill_end: float = 0.0  # first token sampled
    kv_send_start: float = 0.0  # first layer handed to the sender
    kv_send_end: float = 0.0  # the receiver acknowledged every layer

    def to_wire(self) -> list[float]:
        return list(astuple(self))

    @classmethod
    def from_wire(cls, values) -> PrefillStamps:
        return cls(*(float(v) for v in values))


@dataclass
class DecodeStamps:
    """On the decode (or colocated) worker; each token's own time is its batch's `time`."""

    received: float = 0.0  # reserve or generate reached the worker
    prefill_start: float = 0.0  # the local prefill's, or the prefill worker's (hand-off)
    prefill_end: float = 0.0
    kv_received: float = 0.0  # every layer and the first token arrived (disaggregated)
    decode_admitted: float = 0.0  # joined the running batch
    first_token: float = 0.0  # first token pushed
    finished: float = 0.0

    def to_wire(self) -> list[float]:
        return list(astuple(self))

    @classmethod
    def from_wire(cls, values) -> DecodeStamps:
        return cls(*(float(v) for v in values))


@dataclass(frozen=True)
class Handoff:
    """What the decode worker learns from the prefill worker with the first token (the KV
    transfer carries it as opaque bytes), so its final chunk holds the whole timing and the
    router never waits for the prefill worker's own report."""

    num_cached_tokens: int  # prompt tokens the prefill worker's prefix cache served
    prefill_start: float
    prefill_end: float

    def encode(self) -> bytes:
        return msgpack.packb([self.num_cached_tokens, self.prefill_start, self.prefill_end])

    @classmethod
    def decode(cls, data: bytes) -> Handoff:
        """Raises ValueError for anything but a note of this shape."""
        try:
            cached, start, end = msgpack.unpackb(data)
            return cls(int(cached), float(start), float(end))
        except Exception as e:  # noqa: BLE001 - any malformed note is one error
            raise ValueError(f"malformed hand-off note: {e}") from e
