"""A prefill job as the router submits it, and what the prefill worker answers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.engine import SamplingParams


class PrefillState(enum.Enum):
    QUEUED = "queued"  # in the engine's waiting queue, transfer opened
    PREFILLING = "prefilling"  # chunks computing; each layer's KV leaves as it is computed
    TRANSFERRING = "transferring"  # first token sampled and sent; waiting for the receiver's ack
    DONE = "done"  # the decode worker holds all KV and the first token
    FAILED = "failed"  # transfer failed (receiver gone, refused, timed out) or bad job
    ABORTED = "aborted"  # the router aborted it

    @property
    def is_terminal(self) -> bool:
        return self in (PrefillState.DONE, PrefillState.FAILED, PrefillState.ABORTED)


@dataclass(frozen=True)
class PrefillJob:
    """Prefill `prompt_token_ids` and stream their KV to `kv_endpoint` under `transfer_id`
    (the router's id, which the decode worker's reservation also carries)."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    kv_endpoint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not self.transfer_id:
            raise ValueError("transfer_id must not be empty")
        if not self.kv_endpoint:
            raise ValueError("kv_endpoint must not be empty")


@dataclass
class PrefillStamps:
    """time.time() of each stage on the prefill worker; 0.0 where a stage never happened."""

    received: float = 0.0
    prefill_queued: float = 0.0
    prefill_start: float = 0.0
    prefill_end: float = 0.0  # first token sampled
    kv_send_start: float = 0.0
    kv_send_end: float = 0.0  # the receiver acknowledged every layer


@dataclass(frozen=True)
class PrefillResult:
    transfer_id: str
    state: PrefillState  # terminal
    first_token_id: int | None = None
    reason: str = ""  # why, when FAILED or ABORTED
    num_cached_tokens: int = 0  # prompt tokens this worker's prefix cache served
    stamps: PrefillStamps = field(default_factory=PrefillStamps)
