"""KV transfer over ZeroMQ (TCP or IPC): the receiver binds a ROUTER, senders connect DEALERs.

Wire: `[control]` or `[control, payload]` multipart messages; control is a msgpack message
(kvtransfer.messages), payload the raw K+V bytes of a ChunkHeader, sent with `copy=False`
from the sender's staging buffer. Each side runs one I/O thread that alone touches its
sockets; the public methods only exchange state with it under a lock or through a queue,
so they never block on the network.

Handshake: a sender's first message to an endpoint is a Handshake; the receiver answers
with a HandshakeReply and drops frames from peers it has not accepted. Bounded waits: a
handshake or a final Ack that does not come within its timeout fails the transfers
waiting on it, so a vanished receiver never hangs a sender.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
import zmq

from pdserve.kvtransfer.assembly import AssemblingReceiver, Assembly, FrameError
from pdserve.kvtransfer.base import KVSender, KVSpec, TransferResult, TransferStatus
from pdserve.kvtransfer.frames import make_chunk
from pdserve.kvtransfer.mailbox import Mailbox
from pdserve.kvtransfer.messages import (
    Abort,
    Ack,
    ChunkHeader,
    Done,
    Handshake,
    HandshakeReply,
    ProtocolError,
    decode,
    encode,
)
from pdserve.kvtransfer.outgoing import OutgoingBook

_POLL_MS = 20
# The receiver's answer to a sender it has not (or no longer) accepted: it restarted, or
# evicted the pair. The sender then drops the connection; the next begin() handshakes anew.
NO_HANDSHAKE = "no handshake from this sender"


class ZmqReceiver(AssemblingReceiver):
    TRANSPORT = "zmq"

    def __init__(self, spec: KVSpec, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 bind: str = "tcp://127.0.0.1:*"):
        """`bind` is a ZMQ endpoint; a `*` port picks a free one (see `endpoint`)."""
        super().__init__(spec, k_cache, v_cache)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind)
        self._endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peers: set[bytes] = set()  # identities that passed the handshake
        self._outbox = Mailbox()  # replies posted by other threads
        self._closed = threading.Event()
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
        self._outbox.close()
        self._fail_all("receiver closed")

    def _post(self, peer: bytes, msg) -> None:
        """Send `msg` to `peer` from any thread (through the I/O thread)."""
        self._outbox.put((peer, msg))

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        while not self._closed.is_set():
            ready = dict(poller.poll(_POLL_MS))
            if self._sock in ready:
                while True:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            for peer, msg in self._outbox.take():
                self._reply(peer, msg)
            with self._lock:
                now = time.monotonic()
                for a in self._assemblies.values():
                    a.expire(now)

    def _handle(self, frames) -> None:
        peer = frames[0].bytes
        try:
            msg = decode(frames[1].buffer)
        except (ProtocolError, IndexError) as e:
            return self._reply(peer, Ack("", False, f"bad control frame: {e}"))
        if isinstance(msg, Handshake):
            reason = self.spec.handshake(self.TRANSPORT).mismatch(msg)
            if reason is None:
                self._peers.add(peer)
                return self._reply(peer, self._accept_peer(peer))
            return self._reply(peer, HandshakeReply(False, reason))
        tid = getattr(msg, "transfer_id", "")
        if peer not in self._peers:
            return self._reply(peer, Ack(tid, False, NO_HANDSHAKE))
        if self._route(peer, msg, frames):
            return
        with self._lock:
            a = self._assemblies.get(tid)
            if a is None:
                verdict = Ack(tid, False, f"receiver does not expect transfer {tid!r}")
            elif isinstance(msg, ChunkHeader):
                verdict = self._accept(a, msg, frames)
            elif isinstance(msg, Done):
                if not a.expire():
                    a.complete(msg)
                verdict = Ack(tid, a.status is TransferStatus.DONE, a.reason)
            elif isinstance(msg, Abort):
                a.fail(msg.reason)
                verdict = None
            else:
                verdict = Ack(tid, False, f"unexpected {type(msg).__name__}")
        if verdict is not None:
            self._reply(peer, verdict)

    def _accept_peer(self, peer: bytes) -> HandshakeReply:
        """A sender passed the handshake; transports with a side channel set it up here."""
        return HandshakeReply(True)

    def _route(self, peer: bytes, msg, frames) -> bool:
        """Take a message from an accepted peer out of the default path; True if taken."""
        return False

    def _accept(self, a: Assembly, header: ChunkHeader, frames) -> Ack | None:
        if a.expire():
            return Ack(a.transfer_id, False, a.reason)
        if len(frames) != 3:
            a.fail("chunk header without its payload frame")
            return Ack(a.transfer_id, False, a.reason)
        try:
            a.accept(header, frames[2].buffer, self.k_cache, self.v_cache)
        except FrameError as e:
            a.fail(str(e))
            return Ack(a.transfer_id, False, a.reason)
        return None  # frames are acknowledged once, at Done

    def _reply(self, peer: bytes, msg) -> None:
        try:
            self._sock.send_multipart([peer, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; its transfers fail by their deadlines


@dataclass
class _Peer:
    sock: zmq.Socket
    monitor: zmq.Socket  # tells when the connection to the receiver drops
    accepted: bool = False
    disconnected: bool = False
    handshake_deadline: float = 0.0
    forgotten: bool = False  # the receiver answered NO_HANDSHAKE
    backlog: list[tuple] = field(default_factory=list)  # messages held until the handshake
    channel: object = None  # the transport's side channel for payloads, if any


class ZmqSender(KVSender):
    TRANSPORT = "zmq"

    def __init__(self, spec: KVSpec, handshake_timeout_s: float = 5.0,
                 ack_timeout_s: float = 10.0, max_frame_bytes: int = 1 << 20):
        self.spec = spec
        self.max_frame_bytes = max_frame_bytes
        self.handshake_timeout_s = handshake_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self._ctx = zmq.Context.instance()
        self._book = OutgoingBook()
        self._commands = Mailbox()  # in the I/O thread's poller: a command wakes it at once
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    # -- public, any thread ----------------------------------------------------------------

    def begin(self, transfer_id: str, endpoint: str, num_tokens: int) -> None:
        self._book.begin(transfer_id, endpoint, num_tokens)
        self._command(("connect", endpoint))

    def send_layer(self, transfer_id, layer, start, k, v) -> None:
        entry = self._book.get(transfer_id)
        if entry.result.status.is_terminal:
            return
        # Frames of at most max_frame_bytes: while the I/O thread sends one, this thread
        # stages the next, and the receiver checks and scatters frames as they come.
        step = max(1, self.max_frame_bytes // max(1, 2 * k[0].numel() * k.element_size()))
        for i in range(0, k.shape[0], step):
            self._command(("send", entry.endpoint, transfer_id, self._chunk_message(
                transfer_id, layer, start + i, k[i:i + step], v[i:i + step])))
        with self._book.lock:
            if entry.result.status is TransferStatus.PENDING:
                entry.result = TransferResult(TransferStatus.TRANSFERRING)

    def finish(self, transfer_id: str, first_token_id: int) -> None:
        entry = self._book.get(transfer_id)
        done = Done(transfer_id, entry.num_tokens, first_token_id)
        with self._book.lock:  # before queueing: the Ack may come back at once
            entry.ack_deadline = time.monotonic() + self.ack_timeout_s
            entry.first_token_id = first_token_id
        self._command(("send", entry.endpoint, transfer_id, ([encode(done)], None)))

    def poll(self, transfer_id: str) -> TransferResult:
        return self._book.poll(transfer_id)

    def abort(self, transfer_id: str, reason: str) -> None:
        if self._book.fail(transfer_id, reason):
            endpoint = self._book.get(transfer_id).endpoint
            self._command(("send", endpoint, None, ([encode(Abort(transfer_id, reason))], None)))

    def release(self, transfer_id: str) -> None:
        self.abort(transfer_id, "released")
        self._book.release(transfer_id)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._commands.wake()
        self._thread.join()
        self._commands.close()
        self._book.fail_where(lambda entry: True, "sender closed")

    # -- I/O thread ------------------------------------------------------------------------

    def _chunk_message(self, transfer_id, layer, start, k, v) -> tuple:
        """(control frames, side-channel payload or None) for one chunk; copies K and V."""
        header, payload = make_chunk(transfer_id, layer, start, k, v)
        return [encode(header), payload], None

    def _transmit(self, endpoint: str, peer: _Peer, message: tuple) -> None:
        peer.sock.send_multipart(message[0], copy=False)

    def _on_accepted(self, endpoint: str, peer: _Peer, reply: HandshakeReply) -> None:
        """The receiver accepted the handshake; transports with a side channel open it."""

    def _drop_peer(self, endpoint: str, peers: dict, poller: zmq.Poller,
                   linger_ms: int = 0) -> None:
        peer = peers.pop(endpoint)  # a later begin() to it tries again
        poller.unregister(peer.sock)
        poller.unregister(peer.monitor)
        peer.sock.disable_monitor()
        peer.monitor.close(linger=0)
        peer.sock.close(linger=linger_ms)

    def _command(self, cmd: tuple) -> None:
        self._commands.put(cmd)

    def _run(self) -> None:
        peers: dict[str, _Peer] = {}
        poller = zmq.Poller()
        poller.register(self._commands.fd, zmq.POLLIN)
        while not self._closed.is_set():
            self._drain_commands(peers, poller)
            for sock, _ in poller.poll(_POLL_MS):
                if sock == self._commands.fd:
                    continue  # its commands are taken at the top of the loop
                endpoint, peer = next((e, p) for e, p in peers.items()
                                      if sock is p.sock or sock is p.monitor)
                if sock is peer.monitor:
                    peer.monitor.recv_multipart()
                    peer.disconnected = True  # the receiver process closed or died
                else:
                    self._receive(endpoint, peer)
            self._check_deadlines(peers, poller)
        self._drain_commands(peers, poller)  # aborts posted just before close() still leave
        for endpoint in list(peers):
            self._drop_peer(endpoint, peers, poller, linger_ms=1000)

    def _drain_commands(self, peers: dict[str, _Peer], poller: zmq.Poller) -> None:
        for cmd in self._commands.take():
            endpoint = cmd[1]
            peer = peers.get(endpoint)
            if peer is None:
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                # No high-water mark: a send never blocks this thread. What a slow receiver
                # has not taken yet is bounded by the live transfers; a dead one is noticed
                # by the monitor and its queue dropped with the socket.
                sock.setsockopt(zmq.SNDHWM, 0)
                monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                sock.connect(endpoint)
                sock.send(encode(self.spec.handshake(self.TRANSPORT)))
                peer = peers[endpoint] = _Peer(
                    sock, monitor, handshake_deadline=time.monotonic() + self.handshake_timeout_s)
                poller.register(sock, zmq.POLLIN)
                poller.register(monitor, zmq.POLLIN)
            if cmd[0] == "send":
                if cmd[2] is not None and self.poll(cmd[2]).status.is_terminal:
                    continue
                if peer.accepted:
                    self._transmit(endpoint, peer, cmd[3])
                else:
                    peer.backlog.append(cmd[3])

    def _receive(self, endpoint: str, peer: _Peer) -> None:
        while True:
            try:
                msg = decode(peer.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except ProtocolError as e:
                return self._fail_endpoint(endpoint, f"bad reply from receiver: {e}")
            if isinstance(msg, HandshakeReply):
                if not msg.accepted:
                    self._fail_endpoint(endpoint, f"handshake refused: {msg.reason}")
                    peer.backlog.clear()
                    continue
                peer.accepted = True
                self._on_accepted(endpoint, peer, msg)
                for message in peer.backlog:
                    self._transmit(endpoint, peer, message)
                peer.backlog.clear()
            elif isinstance(msg, Ack) and not msg.ok and msg.reason == NO_HANDSHAKE:
                # Fail this endpoint's transfers and drop the connection in one step
                # (_check_deadlines): a transfer begun after the failure shows must go out
                # on a fresh connection, not be failed with the old one.
                peer.forgotten = True
            elif isinstance(msg, Ack) and not msg.ok:
                self._book.fail(msg.transfer_id, msg.reason)
            elif isinstance(msg, Ack):
                # finish() set first_token_id before sending the Done this Ack answers
                try:
                    first = self._book.get(msg.transfer_id).first_token_id
                except ValueError:
                    continue  # released meanwhile
                self._book.settle(msg.transfer_id, TransferResult(TransferStatus.DONE, first))

    def _check_deadlines(self, peers: dict[str, _Peer], poller: zmq.Poller) -> None:
        now = time.monotonic()
        for endpoint, peer in list(peers.items()):
            if not peer.accepted and now > peer.handshake_deadline:
                self._fail_endpoint(endpoint, f"no handshake reply from {endpoint}")
                self._drop_peer(endpoint, peers, poller)
            elif peer.disconnected:  # what it had not taken yet is lost
                self._fail_endpoint(endpoint, f"the receiver at {endpoint} disconnected")
                self._drop_peer(endpoint, peers, poller)
            elif peer.forgotten:  # what was sent on this connection is lost to the receiver
                self._fail_endpoint(endpoint, f"the receiver at {endpoint} forgot this sender "
                                              "(restarted, or closed the pair)")
                self._drop_peer(endpoint, peers, poller)
        self._book.fail_where(lambda e: e.ack_deadline is not None and now > e.ack_deadline,
                              "no acknowledgement from the receiver")

    def _fail_endpoint(self, endpoint: str, reason: str) -> None:
        self._book.fail_where(lambda e: e.endpoint == endpoint, reason)
