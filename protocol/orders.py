"""What the router orders workers to do, and how a job ends.

A request is one `transfer_id` per attempt, chosen by the router. Disaggregated: the
router reserves with a DecodeOrder on a decode worker, then submits a PrefillOrder naming
the KV endpoint that reservation returned. Local (colocated, or a short prompt): one
DecodeOrder that the worker prefills itself. Tokens and outcomes come back on the router's
stream endpoint (protocol.stream), never as the return value of a call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.protocol.sampling import SamplingParams
from pdserve.protocol.stamps import PrefillStamps


class FinishReason(enum.Enum):
    """Why a request's token stream ended."""

    STOP = "stop"  # EOS, a stop token (or, at the router, a stop string)
    LENGTH = "length"  # max_tokens or the model's length
    ABORT = "abort"  # the router aborted it
    ERROR = "error"  # the job failed on the worker (KV never arrived, lease expired, closing)


def _check_ids(transfer_id: str, prompt_token_ids, **endpoints: str) -> tuple[int, ...]:
    if not transfer_id:
        raise ValueError("transfer_id must not be empty")
    for name, value in endpoints.items():
        if not value:
            raise ValueError(f"{name} must not be empty")
    return tuple(prompt_token_ids)


@dataclass(frozen=True)
class DecodeOrder:
    """Decode `transfer_id` and push its tokens to the router's `stream_endpoint`. As a
    reservation, hold blocks for the prompt's KV for at most `lease_s` seconds."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stream_endpoint: str
    lease_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", _check_ids(
            self.transfer_id, self.prompt_token_ids, stream_endpoint=self.stream_endpoint))
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")


@dataclass(frozen=True)
class PrefillOrder:
    """Prefill `prompt_token_ids`, stream their KV to `kv_endpoint` under `transfer_id`, and
    report the outcome (a PrefillOutcome) to `notify_endpoint`, the router's stream."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    kv_endpoint: str
    notify_endpoint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", _check_ids(
            self.transfer_id, self.prompt_token_ids, kv_endpoint=self.kv_endpoint,
            notify_endpoint=self.notify_endpoint))


class PrefillStatus(enum.Enum):
    DONE = "done"  # the decode worker holds every layer and the first token
    FAILED = "failed"  # bad order, or the transfer failed (receiver gone, refused, timed out)
    ABORTED = "aborted"  # the router aborted it


@dataclass(frozen=True)
class PrefillOutcome:
    """How a prefill job ended, pushed to the order's `notify_endpoint` once. The first
    token is not here: it travels to the decode worker only."""

    transfer_id: str
    status: PrefillStatus
    reason: str = ""  # why, when FAILED or ABORTED
    num_cached_tokens: int = 0
    stamps: PrefillStamps = field(default_factory=PrefillStamps)

    def to_wire(self) -> list:
        return [self.transfer_id, self.status.value, self.reason, self.num_cached_tokens,
                self.stamps.to_wire()]

    @classmethod
    def from_wire(cls, item) -> PrefillOutcome:
        tid, status, reason, cached, stamps = item
        return cls(str(tid), PrefillStatus(status), str(reason), int(cached),
                   PrefillStamps.from_wire(stamps))
