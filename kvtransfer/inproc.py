"""In-process fake transport behind the same seam, for unit tests of the workers.

Frames go through the same framing, checks and scatter as on the wire, delivered by a
direct call instead of a socket. Faults are injected through the `InProcHub`, never
through the production transports: a receiver that vanishes, a corrupted frame.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvtransfer.assembly import AssemblingReceiver, FrameError
from kvtransfer.base import KVSender, KVSpec, TransferResult, TransferStatus
from kvtransfer.frames import make_chunk
from kvtransfer.messages import ChunkHeader, Done


class InProcHub:
    """Endpoint registry shared by the fake senders and receivers of one process."""

    def __init__(self) -> None:
        self._receivers: dict[str, InProcReceiver] = {}
        self._corrupt: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._count = 0

    def register(self, receiver: InProcReceiver) -> str:
        with self._lock:
            self._count += 1
            endpoint = f"inproc://receiver-{self._count}"
            self._receivers[endpoint] = receiver
            return endpoint

    def lookup(self, endpoint: str) -> InProcReceiver | None:
        with self._lock:
            return self._receivers.get(endpoint)

    def disconnect(self, endpoint: str) -> None:
        """The receiver vanishes: later frames to it are lost."""
        with self._lock:
            self._receivers.pop(endpoint, None)

    def corrupt_next(self, transfer_id: str, layer: int) -> None:
        """Flip one payload byte of the next frame of `layer` in `transfer_id`."""
        with self._lock:
            self._corrupt.add((transfer_id, layer))

    def take_corruption(self, transfer_id: str, layer: int) -> bool:
        with self._lock:
            key = (transfer_id, layer)
            hit = key in self._corrupt
            self._corrupt.discard(key)
            return hit


class InProcReceiver(AssemblingReceiver):
    def __init__(self, hub: InProcHub, spec: KVSpec, k_cache: torch.Tensor,
                 v_cache: torch.Tensor):
        super().__init__(spec, k_cache, v_cache)
        self.hub = hub
        self._endpoint = hub.register(self)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def close(self) -> None:
        self.hub.disconnect(self._endpoint)
        self._fail_all("receiver closed")

    # -- called by InProcSender ------------------------------------------------------------

    def check_handshake(self, spec: KVSpec) -> str | None:
        return self.spec.handshake().mismatch(spec.handshake())

    def deliver(self, header: ChunkHeader, payload: memoryview) -> str | None:
        """Take a frame; the failure reason when it failed its transfer."""
        with self._lock:
            a = self._assemblies.get(header.transfer_id)
            if a is None:
                return f"receiver does not expect transfer {header.transfer_id!r}"
            if a.expire():
                return a.reason
            try:
                a.accept(header, payload, self.k_cache, self.v_cache)
            except FrameError as e:
                a.fail(str(e))
                return str(e)
            return None

    def deliver_done(self, done: Done) -> TransferResult:
        with self._lock:
            a = self._assemblies.get(done.transfer_id)
            if a is None:
                return TransferResult(TransferStatus.FAILED, reason="unknown transfer")
            if not a.expire():
                a.complete(done)
            return a.result


@dataclass
class _Outgoing:
    endpoint: str
    num_tokens: int
    result: TransferResult


class InProcSender(KVSender):
    def __init__(self, hub: InProcHub, spec: KVSpec):
        self.hub, self.spec = hub, spec
        self._lock = threading.Lock()
        self._transfers: dict[str, _Outgoing] = {}

    def begin(self, transfer_id: str, endpoint: str, num_tokens: int) -> None:
        with self._lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer {transfer_id!r} was already begun")
            self._transfers[transfer_id] = _Outgoing(
                endpoint, num_tokens, TransferResult(TransferStatus.PENDING))
        receiver = self.hub.lookup(endpoint)
        if receiver is None:
            return self._fail(transfer_id, f"no receiver at {endpoint}")
        if (reason := receiver.check_handshake(self.spec)) is not None:
            self._fail(transfer_id, f"handshake refused: {reason}")

    def send_layer(self, transfer_id, layer, start, k, v) -> None:
        receiver = self._live_receiver(transfer_id)
        if receiver is None:
            return
        header, payload = make_chunk(transfer_id, layer, start, k, v)
        if self.hub.take_corruption(transfer_id, layer):
            corrupted = bytearray(payload)
            corrupted[len(corrupted) // 2] ^= 0xFF
            payload = memoryview(bytes(corrupted))
        if (reason := receiver.deliver(header, payload)) is not None:
            return self._fail(transfer_id, reason)
        self._set(transfer_id, TransferResult(TransferStatus.TRANSFERRING))

    def finish(self, transfer_id: str, first_token_id: int) -> None:
        receiver = self._live_receiver(transfer_id)
        if receiver is None:
            return
        num_tokens = self._transfers[transfer_id].num_tokens
        self._set(transfer_id, receiver.deliver_done(Done(transfer_id, num_tokens,
                                                          first_token_id)))

    def poll(self, transfer_id: str) -> TransferResult:
        with self._lock:
            entry = self._transfers.get(transfer_id)
        if entry is None:
            return TransferResult(TransferStatus.FAILED, reason="unknown transfer")
        return entry.result

    def abort(self, transfer_id: str, reason: str) -> None:
        if transfer_id not in self._transfers:
            return
        receiver = self._live_receiver(transfer_id)
        if receiver is not None:
            receiver.abort(transfer_id, reason)
        self._fail(transfer_id, reason)

    def close(self) -> None:
        with self._lock:
            live = [t for t, o in self._transfers.items() if not o.result.status.is_terminal]
        for transfer_id in live:
            self.abort(transfer_id, "sender closed")

    def _live_receiver(self, transfer_id: str) -> InProcReceiver | None:
        with self._lock:
            entry = self._transfers.get(transfer_id)
        if entry is None:
            raise ValueError(f"transfer {transfer_id!r} was never begun")
        if entry.result.status.is_terminal:
            return None
        receiver = self.hub.lookup(entry.endpoint)
        if receiver is None:
            self._fail(transfer_id, f"receiver at {entry.endpoint} is gone")
        return receiver

    def _set(self, transfer_id: str, result: TransferResult) -> None:
        with self._lock:
            entry = self._transfers[transfer_id]
            if not entry.result.status.is_terminal:
                entry.result = result

    def _fail(self, transfer_id: str, reason: str) -> None:
        self._set(transfer_id, TransferResult(TransferStatus.FAILED, reason=reason))
