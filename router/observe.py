"""What the router tells its observers (metrics, traces, request logs) about each request
that reached it, once, when it ends: how it ended, its token counts, when each batch of
tokens reached the router, and, when it finished, its final message (usage, the timing
breakdown from the workers' stamps, SLO, the workers that served it, retries).

Contract: `Router.generate` calls `request_ended` exactly once per request it was handed,
on the router's event loop, after the last message was yielded or the error raised. An
observer must not block or raise (an exception is logged and the others still run).
Requests refused before they reach the router (bad input, a full intake) are the front
end's to report (`RequestOutcome.INVALID` / `REFUSED`, with no final message).

Every dispatch of the request (a retry or a migration adds one) is in `dispatches`, in
order, with the workers' stamps of the stages it reached, whatever the outcome: a request
that failed or was cancelled still shows where its time went.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pdserve.protocol import DecodeStamps
from pdserve.router.tracecontext import TraceContext
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)


class RequestOutcome(enum.Enum):
    FINISHED = "finished"  # the final message went out (stop or length)
    REFUSED = "refused"  # RESOURCE_EXHAUSTED at admission: nothing was dispatched
    INVALID = "invalid"  # INVALID_ARGUMENT: bad input, or a worker refused the job
    FAILED = "failed"  # UNAVAILABLE (no worker, retries spent) or another error status
    CANCELLED = "cancelled"  # the client went away or its deadline passed


class Shortage(enum.Enum):
    """What a refusal says the cluster lacks: the cluster's controller moves a worker
    toward that side (router.controller)."""

    PREFILL = "prefill"  # prompt work ahead would delay the first token, or stall decodes
    DECODE = "decode"  # the decode batch it would join steps slower than its TPOT SLO


@dataclass(frozen=True)
class Dispatch:
    """One dispatch of a request: its transfer id, when it began waiting for workers
    (`started`), when its orders went out (`dispatched`, 0.0 if they never did) and when it
    ended, the workers it went to ("" where none was picked; no prefill worker when the
    decode worker prefilled it), the decode worker's stamps as of its latest chunk (prefill
    worker's stages included), and why it failed ("" unless it did)."""

    transfer_id: str
    started: float
    dispatched: float
    ended: float
    decode_worker: str = ""
    prefill_worker: str = ""
    stamps: DecodeStamps | None = None
    error: str = ""


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    outcome: RequestOutcome
    arrival: float  # time.time() the router got it
    ended: float
    prompt_tokens: int
    completion_tokens: int
    # (time.time(), tokens) per chunk with tokens, as the router received them
    token_times: tuple[tuple[float, int], ...] = ()
    final: pb.FinalResponse | None = None  # FINISHED only
    code: str = ""  # the gRPC status code name, when not FINISHED
    error: str = ""  # its message
    trace: TraceContext | None = None  # its place in a distributed trace (tracecontext)
    dispatches: tuple[Dispatch, ...] = ()
    # the request's SLO (None where it set none), whether or not it finished
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    short_of: Shortage | None = None  # REFUSED only: what it was refused for


class RequestObserver(Protocol):
    def request_ended(self, record: RequestRecord) -> None: ...


def notify(observers: Sequence[RequestObserver], record: RequestRecord) -> None:
    for observer in observers:
        try:
            observer.request_ended(record)
        except Exception:  # noqa: BLE001 - an observer's bug must not end the request
            log.exception("request observer %r failed", observer)
