"""In-process fake transport behind the same seam (`TransportKind.INPROC`), for unit tests of
the workers.

Frames go through the same frame builder, checks and scatter as on the wire, delivered by
a direct call instead of a socket: the sender has no I/O thread, so `send_layer` stages and
delivers synchronously and `finish` settles at once. Endpoints live in an `InProcHub`, by
default the process-wide `InProcHub.instance()`; faults are injected through the hub,
never through the production transports: a receiver that vanishes, a corrupted frame.
"""

from __future__ import annotations

import threading

import torch

from pdserve.kvtransfer.assembly import AssemblingReceiver
from pdserve.kvtransfer.base import KVSender, KVSpec, TransferResult, TransferStatus
from pdserve.kvtransfer.frames import check_kv, stage_frames
from pdserve.kvtransfer.messages import Done
from pdserve.kvtransfer.outgoing import OutgoingBook, clip

TRANSPORT = "inproc"


class InProcHub:
    """Endpoint registry shared by the fake senders and receivers of one process."""

    _instance: InProcHub | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def instance(cls) -> InProcHub:
        """The process-wide hub (made on first use), as `zmq.Context.instance()`."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self._receivers: dict[str, InProcReceiver] = {}
        self._corrupt: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._count = 0

    def register(self, receiver: InProcReceiver) -> str:
        with self._lock:
            self._count += 1
            endpoint = f"inproc://receiver-{id(self):x}-{self._count}"
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

    def check_handshake(self, spec: KVSpec) -> str | None:
        """Why a sender of `spec` is refused, or None (called by InProcSender)."""
        return self.spec.handshake(TRANSPORT).mismatch(spec.handshake(TRANSPORT))


class InProcSender(KVSender):
    def __init__(self, hub: InProcHub, spec: KVSpec, max_frame_bytes: int = 1 << 20):
        self.hub, self.spec, self.max_frame_bytes = hub, spec, max_frame_bytes
        self._book = OutgoingBook()

    def begin(self, transfer_id: str, endpoint: str, num_tokens: int, start: int = 0) -> None:
        self._book.begin(transfer_id, endpoint, num_tokens, start)
        receiver = self.hub.lookup(endpoint)
        if receiver is None:
            self._book.fail(transfer_id, f"no receiver at {endpoint}")
        elif (reason := receiver.check_handshake(self.spec)) is not None:
            self._book.fail(transfer_id, f"handshake refused: {reason}")

    def send_layer(self, transfer_id: str, layer: int, start: int, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        check_kv(k, v)
        receiver = self._live_receiver(transfer_id)
        if receiver is None:
            return
        if (part := clip(self._book.get(transfer_id), start, k, v)) is None:
            return
        start, k, v = part
        # Fresh buffers (the default alloc): several threads may send through one sender.
        for frame in stage_frames(transfer_id, layer, start, k, v, self.max_frame_bytes):
            payload = memoryview(frame.payload.numpy())
            if self.hub.take_corruption(transfer_id, layer):
                payload[len(payload) // 2] ^= 0xFF  # after the checksum was taken
            if (reason := receiver.take_frame(frame.header, payload)) is not None:
                self._book.fail(transfer_id, reason)
                return
        self._book.settle(transfer_id, TransferResult(TransferStatus.TRANSFERRING))

    def finish(self, transfer_id: str, first_token_id: int, note: bytes = b"") -> None:
        receiver = self._live_receiver(transfer_id)
        if receiver is None:
            return
        entry = self._book.get(transfer_id)
        done = Done(transfer_id, entry.num_tokens, first_token_id, bytes(note), entry.start)
        self._book.settle(transfer_id, receiver.take_done(done))

    def poll(self, transfer_id: str) -> TransferResult:
        """The owner polls each live job's transfer every turn of its loop: that is the
        keep-alive of an in-process pair (the ZMQ sender sends one every `keepalive_s`)."""
        if not self._book.poll(transfer_id).status.is_terminal:
            receiver = self._live_receiver(transfer_id)
            if receiver is not None and (why := receiver.renew(transfer_id)) is not None:
                self._book.fail(transfer_id, why)
        return self._book.poll(transfer_id)

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        """`finish` settles in the caller's thread, so after it this returns at once;
        before it, the wait renews the lease once, as one turn of the owner's loop."""
        self.poll(transfer_id)
        return self._book.wait(transfer_id, timeout_s)

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
