"""In-process fake transport behind the same seam, for unit tests of the workers.

Frames go through the same framing, checks and scatter as on the wire, delivered by a
direct call instead of a socket. Faults are injected through the `InProcHub`, never
through the production transports: a receiver that vanishes, a corrupted frame.
"""

from __future__ import annotations

import threading

import torch

from pdserve.kvtransfer.assembly import AssemblingReceiver, FrameError
from pdserve.kvtransfer.base import KVSender, KVSpec, TransferResult, TransferStatus
from pdserve.kvtransfer.frames import make_chunk
from pdserve.kvtransfer.messages import ChunkHeader, Done
from pdserve.kvtransfer.outgoing import OutgoingBook


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


class InProcSender(KVSender):
    def __init__(self, hub: InProcHub, spec: KVSpec):
        self.hub, self.spec = hub, spec
        self._book = OutgoingBook()

    def begin(self, transfer_id: str, endpoint: str, num_tokens: int) -> None:
        self._book.begin(transfer_id, endpoint, num_tokens)
        receiver = self.hub.lookup(endpoint)
        if receiver is None:
            self._book.fail(transfer_id, f"no receiver at {endpoint}")
        elif (reason := receiver.check_handshake(self.spec)) is not None:
            self._book.fail(transfer_id, f"handshake refused: {reason}")

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
            self._book.fail(transfer_id, reason)
        else:
            self._book.settle(transfer_id, TransferResult(TransferStatus.TRANSFERRING))

    def finish(self, transfer_id: str, first_token_id: int) -> None:
        receiver = self._live_receiver(transfer_id)
        if receiver is None:
            return
        done = Done(transfer_id, self._book.get(transfer_id).num_tokens, first_token_id)
        self._book.settle(transfer_id, receiver.deliver_done(done))

    def poll(self, transfer_id: str) -> TransferResult:
        return self._book.poll(transfer_id)

    def abort(self, transfer_id: str, reason: str) -> None:
        if self._book.poll(transfer_id).status.is_terminal:
            return  # unknown or already ended
        if (receiver := self._live_receiver(transfer_id)) is not None:
            receiver.abort(transfer_id, reason)
        self._book.fail(transfer_id, reason)

    def release(self, transfer_id: str) -> None:
        self.abort(transfer_id, "released")
        self._book.release(transfer_id)

    def close(self) -> None:
        for transfer_id in self._book.live_ids():
            self.abort(transfer_id, "sender closed")

    def _live_receiver(self, transfer_id: str) -> InProcReceiver | None:
        entry = self._book.get(transfer_id)
        if entry.result.status.is_terminal:
            return None
        receiver = self.hub.lookup(entry.endpoint)
        if receiver is None:
            self._book.fail(transfer_id, f"receiver at {entry.endpoint} is gone")
        return receiver
