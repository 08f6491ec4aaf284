"""The receiver's control plane over ZeroMQ, composed with a payload channel (kvtransfer.channel).

The receiver binds a ROUTER; senders connect DEALERs. One I/O thread owns the socket: it
checks each sender's Handshake against this side's spec and transport, accepts the peer
(the channel sets up what the peer needs and names it in the HandshakeReply), and refuses
anything else from a peer that did not pass (the NO_HANDSHAKE Ack, after which the sender
reconnects). Chunk headers and Done messages go to the channel, which hands frames and
completions to this object (`FrameSink`), on its thread or the I/O thread; verdicts go back
to the peer through the outbox, which only the I/O thread sends from. A frame is
acknowledged only when it fails its transfer; a transfer once, at Done.

Authentication. With the cluster's CURVE keys (kvtransfer.curve) the ROUTER is a CURVE
server in a gate of its own: a peer without the cluster's client key never completes the
ZMTP handshake, so nothing it sends reaches this thread. Within the cluster, a transfer
belongs to the connection (ZMQ routing id) of the first message that names it after
`expect` (a chunk header, Done, keep-alive or Abort): any message for it from another
connection is refused to that connection only (FOREIGN_TRANSFER) and leaves the transfer
untouched. Transfer ids are unguessable (the router's, 128 random bits) and travel only
on authenticated channels, so the first connection to name one is its sender.

Leases are checked where they matter (`poll`, a frame's arrival, Done, a keep-alive), so
the I/O thread sleeps until a message comes. A keep-alive for a transfer this side no
longer expects is answered with a failing Ack: the sender drops the job it belongs to.
"""

from __future__ import annotations

import threading

import torch
import zmq

from pdserve.kvtransfer.assembly import AssemblingReceiver
from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.channel import FrameSink, ReceiverChannel
from pdserve.kvtransfer.curve import CurveGate, CurveKeyring
from pdserve.kvtransfer.mailbox import Mailbox
from pdserve.kvtransfer.messages import (
    FOREIGN_TRANSFER,
    NO_HANDSHAKE,
    Abort,
    Ack,
    ChunkHeader,
    Done,
    Handshake,
    HandshakeReply,
    KeepAlive,
    ProtocolError,
    StoreRequest,
    decode,
    encode,
)

_IDLE_POLL_MS = 1000  # nothing is due on this thread; the bound guards a lost wake-up


class Receiver(AssemblingReceiver, FrameSink):
    def __init__(self, spec: KVSpec, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 channel: ReceiverChannel, bind: str = "tcp://127.0.0.1:*",
                 curve: CurveKeyring | None = None):
        """`bind` is a ZMQ endpoint; a `*` port picks a free one (see `endpoint`). `curve`:
        the cluster's keys; None leaves the endpoint open to any peer that reaches it."""
        super().__init__(spec, k_cache, v_cache)
        self.channel = channel
        self._handshake = spec.handshake(channel.transport)
        self._gate = CurveGate(curve) if curve is not None else None
        self._sock = (self._gate.server(zmq.ROUTER) if self._gate is not None
                      else zmq.Context.instance().socket(zmq.ROUTER))
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self._endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peers: set[bytes] = set()  # identities that passed the handshake
        self._outbox = Mailbox()  # (peer, message) to send, from any thread
        self._closed = threading.Event()
        channel.start(self, self._endpoint, k_cache.device, k_cache.dtype)
        self._thread = threading.Thread(target=self._run, name="kv-receiver", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._outbox.wake()
        self._thread.join()
        self._sock.close()
        if self._gate is not None:
            self._gate.close()
        self._outbox.close()
        self._fail_all("receiver closed")
        self.channel.close()

    # -- FrameSink: any thread ---------------------------------------------------------------

    def deliver(self, peer: bytes, header: ChunkHeader, payload) -> None:
        if (why := self.take_frame(header, payload)) is not None:
            self._outbox.put((peer, Ack(header.transfer_id, False, why)))

    def complete(self, peer: bytes, done: Done) -> None:
        result = self.take_done(done)
        self._outbox.put((peer, Ack(done.transfer_id, result.status is TransferStatus.DONE,
                                    result.reason)))

    def reject(self, peer: bytes, transfer_id: str, reason: str) -> None:
        self.abort(transfer_id, reason)
        self._outbox.put((peer, Ack(transfer_id, False, reason)))

    def forget(self, peer: bytes) -> None:
        self._peers.discard(peer)

    def post(self, peer: bytes, msg) -> None:
        self._outbox.put((peer, msg))

    # -- I/O thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        while not self._closed.is_set():
            if self._sock in self._outbox.poll(poller, _IDLE_POLL_MS):
                while True:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            for peer, msg in self._outbox.take():
                self._reply(peer, msg)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        try:
            msg = decode(frames[1].buffer)
        except (ProtocolError, IndexError) as e:
            return self._reply(peer, Ack("", False, f"bad control frame: {e}"))
        if isinstance(msg, Handshake):
            reason = self._handshake.mismatch(msg)
            if reason is not None:
                return self._reply(peer, HandshakeReply(False, reason))
            self._peers.add(peer)
            return self._reply(peer, self.channel.accept(peer))
        tid = getattr(msg, "transfer_id", "")
        if peer not in self._peers:
            return self._reply(peer, Ack(tid, False, NO_HANDSHAKE))
        if isinstance(msg, StoreRequest):
            return self.channel.on_store(peer, msg)
        if not self.claim(tid, peer):
            return self._reply(peer, Ack(tid, False, FOREIGN_TRANSFER))
        if isinstance(msg, ChunkHeader):
            self.channel.on_chunk(peer, msg, frames[2:])
        elif isinstance(msg, Done):
            self.channel.on_done(peer, msg)
        elif isinstance(msg, Abort):
            self.abort(tid, msg.reason)
        elif isinstance(msg, KeepAlive):
            if (why := self.renew(tid)) is not None:
                self._reply(peer, Ack(tid, False, why))
        else:
            self._reply(peer, Ack(tid, False, f"unexpected {type(msg).__name__}"))

    def _reply(self, peer: bytes, msg) -> None:
        try:
            self._sock.send_multipart([peer, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; its transfers fail by their deadlines
