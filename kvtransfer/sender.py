"""The sender's control plane over ZeroMQ, composed with a payload channel (kvtransfer.channel).

Threads. The public methods run on the caller's threads (the prefill's compute thread) and
only record: bookkeeping under a lock (OutgoingBook) and a typed command into the I/O
thread's mailbox. They never copy a tensor, hash or touch a socket. One I/O thread owns the
sockets (kvtransfer.links) and the channel; it takes the queued commands in batches, stages
each chunk into frames (kvtransfer.frames) and ships them, reads the receivers' replies,
and enforces the deadlines.

Life of a transfer here: `begin` -> Connect (handshake while the prefill computes);
`send_layer` -> SendChunk, held in the link's backlog until the receiver accepts, then
staged and shipped unless the transfer ended meanwhile; `finish` -> SendDone and an ack
deadline; the receiver's Ack settles DONE or FAILED. Until `finish`, a KeepAlive goes out
every `keepalive_s` for the transfer, so the receiver's lease measures this side's silence,
not how long the job waits in the prefill queue; a receiver that no longer expects it
answers a failing Ack, and the job is dropped before it computes. A refused or late
handshake, a dropped connection, a receiver that forgot us, a failed payload pair or a
missed ack deadline fails every transfer it concerns, so a vanished receiver never hangs a
sender.
"""

from __future__ import annotations

import threading
import time

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.kvtransfer.base import KVSender, KVSpec, TransferResult, TransferStatus
from pdserve.kvtransfer.channel import SenderChannel
from pdserve.kvtransfer.commands import (
    Command,
    Connect,
    SendAbort,
    SendChunk,
    SendControl,
    SendDone,
)
from pdserve.kvtransfer.curve import CurveKeyring
from pdserve.kvtransfer.frames import check_kv, ready_event, stage_frames
from pdserve.kvtransfer.links import Link, Links
from pdserve.kvtransfer.mailbox import Mailbox
from pdserve.kvtransfer.messages import (
    NO_HANDSHAKE,
    Abort,
    Ack,
    Done,
    HandshakeReply,
    KeepAlive,
    ProtocolError,
    StoreReply,
    decode,
    encode,
)
from pdserve.kvtransfer.outgoing import OutgoingBook, clip

# Longest sleep with no deadline due: nothing needs the I/O thread then, so it stays off
# the prefill's core; the bound only guards against a lost wake-up.
_IDLE_POLL_S = 1.0


class Sender(KVSender):
    def __init__(self, spec: KVSpec, channel: SenderChannel, *, handshake_timeout_s: float = 5.0,
                 ack_timeout_s: float = 10.0, max_frame_bytes: int = 1 << 20,
                 wake_bytes: int = 1 << 20, keepalive_s: float = 1.0,
                 curve: CurveKeyring | None = None):
        """`wake_bytes`: `send_layer` wakes the I/O thread once this many bytes of chunks
        wait for it (`finish` and `abort` always do): the chunks of a short prefill's layers
        go out in a few batches, not one wake-up each. `keepalive_s`: how often an
        unfinished transfer's lease is renewed; receivers' leases must be several times it.
        `curve`: the cluster's keys, which every receiver must then hold (kvtransfer.curve)."""
        self.spec, self.channel = spec, channel
        self.ack_timeout_s = ack_timeout_s
        self.keepalive_s = keepalive_s
        self._next_keepalive = time.monotonic() + keepalive_s
        self.max_frame_bytes = max_frame_bytes
        self.wake_bytes = wake_bytes
        self._unwoken_bytes = 0
        self._book = OutgoingBook()
        self._commands = Mailbox()
        self._links = Links(zmq.Context.instance(), encode(spec.handshake(channel.transport)),
                            handshake_timeout_s, curve)
        self._links.poller.register(self._commands.fd, zmq.POLLIN)
        self._closed = threading.Event()
        channel.start(self._commands.wake,
                      lambda endpoint, msg: self._commands.put(SendControl(endpoint, msg)))
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    # -- public, any thread ----------------------------------------------------------------

    def begin(self, transfer_id: str, endpoint: str, num_tokens: int, start: int = 0) -> None:
        self._book.begin(transfer_id, endpoint, num_tokens, start)
        # Wake the I/O thread to connect and handshake while the prefill computes; an
        # endpoint already connected needs nothing before the first chunk.
        self._commands.put(Connect(endpoint), wake=endpoint not in self._links)

    def send_layer(self, transfer_id: str, layer: int, start: int, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        check_kv(k, v)
        entry = self._book.sending(transfer_id)
        if entry is not None and (part := clip(entry, start, k, v)) is not None:
            start, k, v = part
            cmd = SendChunk(entry.endpoint, transfer_id, layer, start, k, v, ready_event(k))
            # Each wake-up takes the prefill's core from it (a context switch, the GIL, a
            # batch of ZMQ sends instead of one): batch small layers. Unlocked: a lost
            # update between two calling threads only moves a wake-up by one chunk.
            self._unwoken_bytes += cmd.nbytes
            wake = self._unwoken_bytes >= self.wake_bytes
            if wake:
                self._unwoken_bytes = 0
            self._commands.put(cmd, wake)

    def finish(self, transfer_id: str, first_token_id: int, note: bytes = b"") -> None:
        entry = self._book.finishing(transfer_id, first_token_id,
                                     time.monotonic() + self.ack_timeout_s)
        done = Done(transfer_id, entry.num_tokens, first_token_id, bytes(note), entry.start)
        self._commands.put(SendDone(entry.endpoint, done))

    def poll(self, transfer_id: str) -> TransferResult:
        return self._book.poll(transfer_id)

    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        return self._book.wait(transfer_id, timeout_s)

    def abort(self, transfer_id: str, reason: str) -> None:
        if self._book.fail(transfer_id, reason):
            endpoint = self._book.get(transfer_id).endpoint
            self._commands.put(SendAbort(endpoint, Abort(transfer_id, reason)))

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

    def _run(self) -> None:
        links = self._links
        while not self._closed.is_set():
            for cmd in self._commands.take():
                self._execute(cmd)
            for sock in self._commands.poll(links.poller, self._sleep_ms()):
                link = links.owner(sock)
                if link is None:
                    continue  # the mailbox: its commands are taken at the top of the loop
                if sock is link.monitor:
                    event = recv_monitor_message(link.monitor)["event"]
                    if event == zmq.EVENT_DISCONNECTED:
                        link.disconnected = True  # the receiver process closed or died
                    else:
                        link.refused = True
                else:
                    self._receive(link)
            self._check()
        # Aborts posted just before close() still leave; the rest would be failed anyway.
        for cmd in self._commands.take():
            if isinstance(cmd, SendAbort):
                self._execute(cmd)
        self.channel.close()  # first: it waits for its pairs, which dropping would not
        for link in links:
            self._drop(link, linger_ms=1000)

    def _sleep_ms(self) -> int:
        due = [t for t in (self._links.next_handshake_deadline(), self._book.next_ack_deadline(),
                           self._next_keepalive) if t is not None]
        wait = min(due, default=time.monotonic() + _IDLE_POLL_S) - time.monotonic()
        return max(0, min(int(wait * 1000) + 1, int(_IDLE_POLL_S * 1000)))

    def _execute(self, cmd: Command) -> None:
        link = self._links.get(cmd.endpoint)
        if isinstance(cmd, SendControl):
            if link is not None and link.accepted:
                link.sock.send(encode(cmd.message))
            return
        if link is None:
            try:
                link = self._links.open(cmd.endpoint)
            except zmq.ZMQError as e:
                return self._fail_endpoint(cmd.endpoint, f"cannot connect to {cmd.endpoint}: {e}")
        if isinstance(cmd, Connect):
            return
        if link.accepted:
            self._transmit(link, cmd)
        else:
            link.backlog.append(cmd)

    def _transmit(self, link: Link, cmd: Command) -> None:
        if isinstance(cmd, SendAbort):
            link.sock.send(encode(cmd.abort))
        elif isinstance(cmd, SendDone):
            if self._book.is_live(cmd.done.transfer_id):
                link.sock.send(encode(cmd.done))
        elif isinstance(cmd, SendChunk) and self._book.is_live(cmd.transfer_id):
            try:
                for frame in stage_frames(cmd.transfer_id, cmd.layer, cmd.start, cmd.k, cmd.v,
                                          self.max_frame_bytes, self.channel.alloc, cmd.ready):
                    self.channel.ship(link.endpoint, link.sock, frame)
            except Exception as e:  # e.g. out of memory: fail the transfer, keep the thread
                self._book.fail(cmd.transfer_id, f"staging failed: {e!r}")

    def _receive(self, link: Link) -> None:
        while True:
            try:
                msg = decode(link.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except ProtocolError as e:
                return self._fail_endpoint(link.endpoint, f"bad reply from receiver: {e}")
            if isinstance(msg, HandshakeReply):
                if not self._on_handshake_reply(link, msg):
                    return  # refused: the link is gone
            elif isinstance(msg, StoreReply):
                self.channel.on_store_reply(link.endpoint, msg)
            elif isinstance(msg, Ack) and not msg.ok and msg.reason == NO_HANDSHAKE:
                # Fail this endpoint's transfers and drop the connection in one step
                # (_check): a transfer begun after the failure shows must go out on a
                # fresh connection, not be failed with the old one.
                link.forgotten = True
            elif isinstance(msg, Ack) and not msg.ok:
                self._book.fail(msg.transfer_id, msg.reason)
            elif isinstance(msg, Ack):
                # finish() set first_token_id before queueing the Done this Ack answers
                try:
                    first = self._book.get(msg.transfer_id).first_token_id
                except ValueError:
                    continue  # released meanwhile
                self._book.settle(msg.transfer_id, TransferResult(TransferStatus.DONE, first))

    def _on_handshake_reply(self, link: Link, reply: HandshakeReply) -> bool:
        """Accepted: send the backlog, True. Refused: fail and drop the link, False (a later
        begin() to the endpoint asks again)."""
        backlog, link.backlog = link.backlog, []
        why = (f"handshake refused: {reply.reason}" if not reply.accepted
               else self.channel.open(link.endpoint, reply))
        if why is not None:
            self._fail_endpoint(link.endpoint, why)
            self._drop(link)
            return False
        link.accepted = True
        for cmd in backlog:
            self._transmit(link, cmd)
        return True

    def _check(self) -> None:
        now = time.monotonic()
        failures = self.channel.failures()
        for link in self._links:
            if not link.accepted and now > link.handshake_deadline:
                why = f"no handshake reply from {link.endpoint}"
            elif link.refused:
                why = (f"the receiver at {link.endpoint} refused the connection: it does not "
                       "hold this cluster's CURVE keys, or this sender does not hold its")
            elif link.disconnected:  # what it had not taken yet is lost
                why = f"the receiver at {link.endpoint} disconnected"
            elif link.forgotten:  # what was sent on this connection is lost to the receiver
                why = (f"the receiver at {link.endpoint} forgot this sender (restarted, or "
                       "closed the pair)")
            elif link.endpoint in failures:
                why = failures[link.endpoint]
            else:
                continue
            self._fail_endpoint(link.endpoint, why)
            self._drop(link)
        for endpoint in self.channel.evictable(self._book.live_endpoints):
            if (link := self._links.get(endpoint)) is not None:
                self._drop(link)
        if (due := self._book.next_ack_deadline()) is not None and now > due:
            self._book.fail_where(lambda e: e.ack_deadline is not None and now > e.ack_deadline,
                                  "no acknowledgement from the receiver")
        if now >= self._next_keepalive:
            self._next_keepalive = now + self.keepalive_s
            self._keep_alive()

    def _keep_alive(self) -> None:
        """Renew the lease of every transfer whose job has not finished; one whose link is
        not accepted yet needs none (its receiver's lease started at reserve, and the
        handshake deadline is shorter)."""
        for transfer_id, endpoint in self._book.unfinished():
            link = self._links.get(endpoint)
            if link is not None and link.accepted:
                try:
                    link.sock.send(encode(KeepAlive(transfer_id)), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # a full or closed pipe: the link's own checks fail the transfer

    def _drop(self, link: Link, linger_ms: int = 0) -> None:
        self.channel.close_pair(link.endpoint)
        self._links.drop(link, linger_ms)

    def _fail_endpoint(self, endpoint: str, reason: str) -> None:
        self._book.fail_where(lambda e: e.endpoint == endpoint, reason)
