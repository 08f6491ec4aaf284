"""What the router orders workers to do, and how a job ends.

A request is one `transfer_id` per attempt, chosen by the router. Disaggregated: the
router reserves with a DecodeOrder on a decode worker, then submits a PrefillOrder naming
the KV endpoint that reservation returned (a Reservation) and where the KV it sends
starts: the decode worker's prefix cache may hold the prompt's leading blocks already
(see Delta transfers). Local (colocated, or a short prompt): one
DecodeOrder that the worker prefills itself. Tokens and outcomes come back on the router's
stream endpoint (protocol.stream), never as the return value of a call.

Leases: a reservation holds the decode worker's blocks while the prefill side shows signs
of progress: each KV frame, and while the prefill job waits or computes, a keep-alive from
its sender every second. `lease_s` of silence ends it (blocks freed), so a job that waits
behind long prefills keeps its reservation, and a prefill worker that died or hangs frees
it. Deadlines: an order carries the request's `deadline` (epoch seconds, None for none);
a worker ends a job whose deadline passed, before its prefill runs if it has not yet.

Re-sends: a prefill job keeps its KV blocks until the decode side acknowledges every layer.
When its transfer fails after the prefill started (the decode worker died, hung or lost
the reservation), it reports HELD and goes on holding the KV (finishing the prefill if it
was midway) for the worker's `hold_s`. A PrefillOrder with `resend_of` naming that job
moves it to the new transfer: the KV computed so far goes to the new decode worker from
the blocks, the rest as it is computed, and nothing is computed twice. The router that
does not re-send aborts the held job; a held job no order claims ends when `hold_s` pass.

Delta transfers: a reservation takes references on the decode worker's cached blocks for
the prompt's longest cached prefix (whole blocks, never the last prompt token) and holds
fresh blocks for the rest; `Reservation.num_cached_tokens` says how many tokens that is,
and the router passes it on as `PrefillOrder.kv_start`. The prefill worker still computes
the whole prompt (from its own prefix cache where it can) but sends only the KV of
positions [kv_start, prompt length), at least the last token's. Ownership does not move:
the decode engine holds one reference per cached block from `reserve` until the job ends
(admitted and finished, aborted, lease expired, failed transfer), so the blocks cannot be
evicted between the match and their use, and it drops exactly those references then.
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
    reservation, hold blocks for the prompt's KV until the prefill side has been silent for
    `lease_s` seconds (see the module's Leases)."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stream_endpoint: str
    lease_s: float = 10.0
    deadline: float | None = None  # time.time() after which the job is dropped

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", _check_ids(
            self.transfer_id, self.prompt_token_ids, stream_endpoint=self.stream_endpoint))
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(frozen=True)
class Reservation:
    """A decode worker's answer to a reservation: where the KV goes, and how many leading
    prompt tokens (whole blocks of that worker) its prefix cache holds for the job already,
    so they are not sent (see Delta transfers)."""

    kv_endpoint: str
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.kv_endpoint:
            raise ValueError("kv_endpoint must not be empty")
        if self.num_cached_tokens < 0:
            raise ValueError(f"num_cached_tokens must be >= 0, got {self.num_cached_tokens}")


@dataclass(frozen=True)
class PrefillOrder:
    """Prefill `prompt_token_ids`, stream their KV to `kv_endpoint` under `transfer_id`, and
    report the outcome (a PrefillOutcome) to `notify_endpoint`, the router's stream."""

    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    kv_endpoint: str
    notify_endpoint: str
    deadline: float | None = None  # time.time() after which the job is dropped
    # the transfer id of a job of this prompt that the worker holds (see Re-sends): its KV
    # goes to `kv_endpoint` under `transfer_id`, without computing it again
    resend_of: str = ""
    # the decode side holds positions [0, kv_start) (its Reservation's num_cached_tokens):
    # only the KV from there on is sent (see Delta transfers)
    kv_start: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", _check_ids(
            self.transfer_id, self.prompt_token_ids, kv_endpoint=self.kv_endpoint,
            notify_endpoint=self.notify_endpoint))
        if self.resend_of == self.transfer_id:
            raise ValueError("resend_of must name another transfer id")
        if not 0 <= self.kv_start < len(self.prompt_token_ids):
            raise ValueError(f"kv_start must be in [0, {len(self.prompt_token_ids)}), got "
                             f"{self.kv_start}: the last prompt token's KV is always sent")

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class PrefillStatus(enum.Enum):
    DONE = "done"  # the decode worker holds every layer and the first token
    FAILED = "failed"  # bad order, its computation failed, or its transfer failed while queued
    ABORTED = "aborted"  # the router aborted it, or its deadline passed
    # the transfer failed (receiver gone, refused, timed out) once the prefill had started:
    # the job keeps its KV for a re-send (see Re-sends)
    HELD = "held"


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
