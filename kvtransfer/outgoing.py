"""Sender-side bookkeeping, shared by every transport: which transfers are open, to which
endpoint, and how each one stands. A result only ever moves forward: once DONE or FAILED
it stays so (`settle` ignores later verdicts). Every method is thread-safe; `wait` blocks
until a verdict is recorded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.kvtransfer.base import TransferResult, TransferStatus


@dataclass
class Outgoing:
    endpoint: str
    num_tokens: int
    start: int = 0  # first position sent: the receiver holds [0, start)
    result: TransferResult = field(
        default_factory=lambda: TransferResult(TransferStatus.PENDING))
    ack_deadline: float | None = None  # set by finish()
    first_token_id: int | None = None  # set by finish()


class OutgoingBook:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._ended = threading.Condition(self.lock)  # notified whenever a result turns final
        self._transfers: dict[str, Outgoing] = {}

    def begin(self, transfer_id: str, endpoint: str, num_tokens: int,
              start: int = 0) -> Outgoing:
        if not 0 <= start < num_tokens:
            raise ValueError(f"transfer {transfer_id!r}: start {start} outside "
                             f"[0, {num_tokens})")
        with self.lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer {transfer_id!r} was already begun")
            entry = self._transfers[transfer_id] = Outgoing(endpoint, num_tokens, start)
            return entry

    def get(self, transfer_id: str) -> Outgoing:
        with self.lock:
            entry = self._transfers.get(transfer_id)
        if entry is None:
            raise ValueError(f"transfer {transfer_id!r} was never begun")
        return entry

    def sending(self, transfer_id: str) -> Outgoing | None:
        """A layer is being sent: the transfer, or None once it has ended. Raises
        ValueError for an id never begun."""
        with self.lock:
            entry = self._transfers.get(transfer_id)
            if entry is None:
                raise ValueError(f"transfer {transfer_id!r} was never begun")
            if entry.result.status.is_terminal:
                return None
            if entry.result.status is TransferStatus.PENDING:
                entry.result = TransferResult(TransferStatus.TRANSFERRING)
            return entry

    def finishing(self, transfer_id: str, first_token_id: int, ack_deadline: float) -> Outgoing:
        """Everything was queued: the Ack is due by `ack_deadline`. Raises ValueError for an
        id never begun."""
        with self.lock:  # before the Done is queued: its Ack may come back at once
            entry = self._transfers.get(transfer_id)
            if entry is None:
                raise ValueError(f"transfer {transfer_id!r} was never begun")
            entry.ack_deadline, entry.first_token_id = ack_deadline, first_token_id
            return entry

    def is_live(self, transfer_id: str) -> bool:
        with self.lock:
            entry = self._transfers.get(transfer_id)
            return entry is not None and not entry.result.status.is_terminal

    def next_ack_deadline(self) -> float | None:
        with self.lock:
            return min((e.ack_deadline for e in self._transfers.values()
                        if e.ack_deadline is not None and not e.result.status.is_terminal),
                       default=None)

    def poll(self, transfer_id: str) -> TransferResult:
        with self.lock:
            entry = self._transfers.get(transfer_id)
            if entry is None:
                return TransferResult(TransferStatus.FAILED, reason="unknown transfer")
            return entry.result

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        """The result once it is final, or as it stands after `timeout_s`."""
        with self.lock:
            self._ended.wait_for(lambda: self._final(transfer_id), timeout_s)
            entry = self._transfers.get(transfer_id)
            if entry is None:
                return TransferResult(TransferStatus.FAILED, reason="unknown transfer")
            return entry.result

    def _final(self, transfer_id: str) -> bool:
        entry = self._transfers.get(transfer_id)
        return entry is None or entry.result.status.is_terminal

    def settle(self, transfer_id: str, result: TransferResult) -> bool:
        """Record `result` unless the transfer already ended; True if it was recorded."""
        with self.lock:
            entry = self._transfers.get(transfer_id)
            if entry is None or entry.result.status.is_terminal:
                return False
            entry.result = result
            if result.status.is_terminal:
                self._ended.notify_all()
            return True

    def fail(self, transfer_id: str, reason: str) -> bool:
        return self.settle(transfer_id, TransferResult(TransferStatus.FAILED, reason=reason))

    def fail_where(self, predicate: Callable[[Outgoing], bool], reason: str) -> None:
        """Fail every live transfer for which `predicate(entry)` holds."""
        failed = TransferResult(TransferStatus.FAILED, reason=reason)
        with self.lock:
            for entry in self._transfers.values():
                if not entry.result.status.is_terminal and predicate(entry):
                    entry.result = failed
            self._ended.notify_all()

    def live_ids(self) -> list[str]:
        with self.lock:
            return [t for t, e in self._transfers.items() if not e.result.status.is_terminal]

    def unfinished(self) -> list[tuple[str, str]]:
        """(transfer id, endpoint) of each live transfer not yet finished: its job still
        waits or computes, and the receiver's lease on it needs renewing."""
        with self.lock:
            return [(t, e.endpoint) for t, e in self._transfers.items()
                    if e.ack_deadline is None and not e.result.status.is_terminal]

    def live_endpoints(self) -> set[str]:
        with self.lock:
            return {e.endpoint for e in self._transfers.values()
                    if not e.result.status.is_terminal}

    def release(self, transfer_id: str) -> None:
        with self.lock:
            self._transfers.pop(transfer_id, None)


def clip(entry: Outgoing, start: int, k, v):
    """`(start, k, v)` without the positions below the transfer's start (the receiver holds
    them), or None when nothing is left to send."""
    skip = entry.start - start
    if skip <= 0:
        return start, k, v
    if skip >= k.shape[0]:
        return None
    return entry.start, k[skip:], v[skip:]
