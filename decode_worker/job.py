"""A decode job as the router submits it, its states, and its stage stamps."""

from __future__ import annotations

import enum
from dataclasses import astuple, dataclass

from pdserve.engine import SamplingParams


class DecodeState(enum.Enum):
    RESERVED = "reserved"  # blocks held under a lease, no KV arrived yet
    RECEIVING = "receiving"  # KV frames arriving into the reserved blocks
    QUEUED = "queued"  # local prefill: waiting in the engine
    PREFILLING = "prefilling"  # local prefill: chunks computing
    DECODING = "decoding"  # in the running batch, one token per step


@dataclass(frozen=True)
class DecodeJob:
    """Decode `transfer_id` (the router's id for this attempt) and push its tokens to the
    router's `stream_endpoint`. For `reserve`, `lease_s` bounds how long the blocks wait
    for the prompt's KV."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    stream_endpoint: str
    lease_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not self.transfer_id:
            raise ValueError("transfer_id must not be empty")
        if not self.stream_endpoint:
            raise ValueError("stream_endpoint must not be empty")
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")


@dataclass
class DecodeStamps:
    """time.time() of each stage on the decode (or colocated) worker; 0.0 where a stage never
    happened. Each token's time is its TokenBatch's `time`."""

    received: float = 0.0  # reserve or generate applied
    prefill_start: float = 0.0  # local prefill only
    prefill_end: float = 0.0  # local prefill only
    kv_received: float = 0.0  # every layer and the first token arrived
    decode_admitted: float = 0.0  # joined the running batch
    first_token: float = 0.0  # first token pushed
    finished: float = 0.0

    def to_wire(self) -> list[float]:
        return list(astuple(self))

    @classmethod
    def from_wire(cls, values: list[float]) -> DecodeStamps:
        return cls(*(float(v) for v in values))
