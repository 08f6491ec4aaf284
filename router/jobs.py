"""What the router asks of workers, in its own types: the handle implementations
(deploy/) turn them into the workers' job classes, which the router never imports."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Sampling as the engine runs it; stop strings stay with the router's detokenizer."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class DecodeOrder:
    """Reserve blocks for (or, `generate`, prefill locally) a prompt; tokens go to the
    router's `stream_endpoint` keyed by `transfer_id`."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    stream_endpoint: str
    lease_s: float


@dataclass(frozen=True)
class PrefillOrder:
    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    kv_endpoint: str


class PrefillStatus(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class PrefillOutcome:
    status: PrefillStatus
    first_token_id: int | None
    reason: str
    num_cached_tokens: int
    prefill_start: float  # Unix seconds, 0.0 if it never started
    prefill_end: float
