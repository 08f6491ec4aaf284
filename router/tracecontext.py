"""A request's place in a distributed trace (W3C Trace Context), minted when the request
reaches the router so the client can be told its trace before the trace is built.

A client that sends a `traceparent` (gRPC metadata, HTTP header) gets its request's spans
in its own trace, under its span; any other request starts a trace of its own. Either way
the router answers with the `traceparent` of the request's root span, and every observer
sees the same ids (router.tracing builds the spans; router.request_log writes the ids).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

TRACEPARENT = "traceparent"
_HEADER = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def random_id(bits: int) -> int:
    """A random id of `bits` bits, never 0 (0 means none in W3C Trace Context)."""
    while not (value := secrets.randbits(bits)):
        pass
    return value


@dataclass(frozen=True)
class TraceContext:
    trace_id: int  # 128 bits, never 0
    span_id: int  # the request's root span, 64 bits, never 0
    parent_span_id: int = 0  # the client's span, 0 when the request starts the trace
    sampled: bool = True  # the client's choice; an unsampled trace is not exported

    @classmethod
    def start(cls, traceparent: str | None = None) -> TraceContext:
        """The context of a new request: under the client's `traceparent` when it is
        valid, else in a trace of its own (a malformed header is ignored, as the W3C
        recommendation says)."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is None:
            return cls(random_id(128), random_id(64))
        trace_id, parent_id, sampled = parent
        return cls(trace_id, random_id(64), parent_id, sampled)

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext:
        """`start` from gRPC invocation metadata (keys are lower case)."""
        for key, value in metadata or ():
            if key == TRACEPARENT and isinstance(value, str):
                return cls.start(value)
        return cls.start()

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def traceparent(self) -> str:
        """The W3C header naming the request's root span."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


def parse_traceparent(header: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid `traceparent`, else None."""
    m = _HEADER.match(header.strip().lower())
    if m is None:
        return None
    version, trace_hex, span_hex, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)
