"""The payload seam: how a chunk's K+V bytes travel beside the ZMQ control plane.

One control plane per side (`sender.Sender`, `receiver.Receiver`) does everything a
transport shares: DEALER/ROUTER sockets, handshake, acceptance, backlog, deadlines, acks.
It is composed with one channel object per side that moves only the payload bytes:
`inline_channel` (the payload is the second ZMQ frame of the chunk message) or
`torch_channel` (a torch.distributed group per sender-receiver pair).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
import zmq

from pdserve.kvtransfer.frames import Frame
from pdserve.kvtransfer.messages import (
    ChunkHeader,
    Done,
    HandshakeReply,
    Message,
    StoreReply,
    StoreRequest,
)


class SenderChannel(ABC):
    """Sender side, one per sender. Every method but `start` is called on the sender's I/O
    thread only, so a channel needs no lock for its own state.

    Staging memory: the frame builder stages each frame into `alloc(nbytes)`. The channel
    owns that memory and decides its life: a buffer it reuses must be consumed by `ship`
    before `ship` returns (copied into ZMQ, say); a buffer handed to another thread is
    freed when that thread drops it. Per receiver endpoint the channel keeps a pair from
    `open` until `close_pair`; a pair that failed is reported by `failures`, and the
    control plane then fails that endpoint's transfers and closes the pair.
    """

    transport: str  # the handshake's `transport`: both sides must name the same

    def start(self, wake: Callable[[], None], post: Callable[[str, Message], None]) -> None:
        """Called once, before the I/O thread starts; `wake()` (from any thread) makes the
        I/O thread look at `failures` and `evictable` soon; `post(endpoint, message)` (from
        any thread) sends a control message on the accepted connection to `endpoint`, and
        drops it when there is none (the pair is then being closed)."""
        self.wake = wake
        self.post = post

    @abstractmethod
    def alloc(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` to stage one frame into (on the payload's device)."""

    def open(self, endpoint: str, reply: HandshakeReply) -> str | None:
        """The receiver at `endpoint` accepted; set up its pair. Why not, or None."""
        return None

    @abstractmethod
    def ship(self, endpoint: str, sock: zmq.Socket, frame: Frame) -> None:
        """Send one frame to an accepted `endpoint`: its header on `sock` (the control
        stream, in order with Done and Abort), its payload by this channel's way."""

    def on_store_reply(self, endpoint: str, reply: StoreReply) -> None:  # noqa: B027
        """The receiver at `endpoint` answered a StoreRequest this channel posted."""

    def failures(self) -> dict[str, str]:
        """Endpoints whose pair failed, with why."""
        return {}

    def evictable(self, live_endpoints: Callable[[], set[str]]) -> Sequence[str]:
        """Endpoints whose idle pairs to close now, to keep within this channel's bound;
        `live_endpoints()` names those with transfers still open."""
        return ()

    def close_pair(self, endpoint: str) -> None:  # noqa: B027 - a channel without pairs
        """The control plane dropped the connection to `endpoint` (idempotent)."""

    def close(self) -> None:  # noqa: B027 - nothing to end without pairs
        """The sender closes: end every pair."""


class FrameSink(ABC):
    """What a receiver channel hands frames to: the receiver's control plane. Thread-safe;
    verdicts travel back to the peer through the control plane's I/O thread."""

    @abstractmethod
    def deliver(self, peer: bytes, header: ChunkHeader,
                payload: bytes | memoryview | torch.Tensor) -> None:
        """Check a frame and scatter it into its transfer's blocks; a failure is sent back.
        `payload` is host bytes or, from a GPU channel, a uint8 device tensor."""

    @abstractmethod
    def complete(self, peer: bytes, done: Done) -> None:
        """The sender sent everything before `done`: settle the transfer and acknowledge."""

    @abstractmethod
    def reject(self, peer: bytes, transfer_id: str, reason: str) -> None:
        """Fail a transfer whose payload cannot be taken, and tell the peer."""

    @abstractmethod
    def forget(self, peer: bytes) -> None:
        """(I/O thread only) the peer must handshake again before it is heard."""

    @abstractmethod
    def post(self, peer: bytes, msg: Message) -> None:
        """Send a control message to an accepted peer (any thread)."""


class ReceiverChannel(ABC):
    """Receiver side, one per receiver. `start`, `accept`, `on_chunk` and `on_done` run on
    the receiver's I/O thread in the order the peer's messages came; a channel may hand
    them to threads of its own if it keeps each peer's order. Payload memory is the
    channel's until `deliver` returns (the sink copies out by scattering)."""

    transport: str

    def start(self, sink: FrameSink, endpoint: str, device: torch.device,
              dtype: torch.dtype) -> None:
        """Called once, before the I/O thread starts: where frames go, the receiver's bound
        ZMQ endpoint, and the device and dtype of its KV cache."""
        self.sink = sink

    def accept(self, peer: bytes) -> HandshakeReply:
        """`peer` passed the handshake: set up what it needs; the reply to send it."""
        return HandshakeReply(True)

    @abstractmethod
    def on_chunk(self, peer: bytes, header: ChunkHeader, rest: list[zmq.Frame]) -> None:
        """A chunk header from an accepted peer; `rest` is what followed it in the message."""

    def on_done(self, peer: bytes, done: Done) -> None:
        """A Done from an accepted peer, after all its chunk headers."""
        self.sink.complete(peer, done)

    def on_store(self, peer: bytes, req: StoreRequest) -> None:
        """A rendezvous request from an accepted peer; the answer goes by `sink.post`."""
        self.sink.post(peer, StoreReply(req.seq, False,
                                        reason=f"the {self.transport} transport has no "
                                        "rendezvous store"))

    def close(self) -> None:  # noqa: B027 - nothing to end without pairs
        """The receiver closes (after its I/O thread stopped)."""
