"""A sender's connections, one DEALER per receiver endpoint, owned by its I/O thread.

Life of a link: `open` connects, sends the Handshake and starts the handshake deadline;
commands for the endpoint wait in `backlog` until the HandshakeReply accepts; then they go
out in order. A link ends (`drop`) when the handshake is refused or late, when the monitor
reports the connection dropped, when the receiver answers that it does not know this
sender, when the ZMTP handshake fails (CURVE keys that differ), or when its payload pair
fails or is evicted; a later command for the endpoint opens a fresh link and handshakes
anew.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import zmq

from pdserve.kvtransfer.commands import Command
from pdserve.kvtransfer.curve import CurveKeyring, secure_client

# what the sender's I/O thread hears of a link's connection
MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass
class Link:
    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket  # tells when the connection to the receiver drops
    handshake_deadline: float
    accepted: bool = False
    disconnected: bool = False
    forgotten: bool = False  # the receiver answered that it has no handshake from us
    refused: bool = False  # the ZMTP handshake failed: the receiver holds other CURVE keys
    backlog: list[Command] = field(default_factory=list)  # held until the handshake


class Links:
    """The links by endpoint and by socket, and the poller that holds their sockets."""

    def __init__(self, ctx: zmq.Context, handshake: bytes, handshake_timeout_s: float,
                 curve: CurveKeyring | None = None):
        """`curve`: the cluster's keys; every link then is a CURVE client (kvtransfer.curve),
        and a receiver without the cluster's server key is never reached."""
        self._ctx, self._handshake, self._timeout_s = ctx, handshake, handshake_timeout_s
        self._curve = curve
        self.poller = zmq.Poller()
        self._by_endpoint: dict[str, Link] = {}
        self._by_socket: dict[zmq.Socket, Link] = {}

    def get(self, endpoint: str) -> Link | None:
        return self._by_endpoint.get(endpoint)

    def __contains__(self, endpoint: str) -> bool:
        """Whether a link to `endpoint` is open (a hint from other threads: it may change
        right after)."""
        return endpoint in self._by_endpoint

    def owner(self, sock) -> Link | None:
        return self._by_socket.get(sock)

    def __iter__(self):
        return iter(list(self._by_endpoint.values()))

    def open(self, endpoint: str) -> Link:
        """Connect and send the handshake. Raises zmq.ZMQError for an endpoint ZMQ cannot
        connect to (a malformed address, an unknown transport)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # No high-water mark: a send never blocks the I/O thread. What a slow receiver has
        # not taken yet is bounded by the live transfers; a dead one is noticed by the
        # monitor and its queue dropped with the socket.
        sock.setsockopt(zmq.SNDHWM, 0)
        if self._curve is not None:
            secure_client(sock, self._curve)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        monitor = sock.get_monitor_socket(MONITORED)
        sock.send(self._handshake)
        link = Link(endpoint, sock, monitor, time.monotonic() + self._timeout_s)
        self._by_endpoint[endpoint] = link
        self._by_socket[sock] = self._by_socket[monitor] = link
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(monitor, zmq.POLLIN)
        return link

    def drop(self, link: Link, linger_ms: int = 0) -> None:
        if self._by_endpoint.get(link.endpoint) is not link:
            return  # already dropped
        del self._by_endpoint[link.endpoint]
        for sock in (link.sock, link.monitor):
            del self._by_socket[sock]
            self.poller.unregister(sock)
        link.sock.disable_monitor()
        link.monitor.close(linger=0)
        link.sock.close(linger=linger_ms)

    def next_handshake_deadline(self) -> float | None:
        pending = [lk.handshake_deadline for lk in self._by_endpoint.values() if not lk.accepted]
        return min(pending, default=None)
