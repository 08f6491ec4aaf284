"""A worker's end of the stream to the routers (protocol.stream): one ZMQ DEALER socket per
router endpoint, and at most one message per engine step, kind and endpoint; and the watch
that tells when a router is gone.

Each socket has a routing id of 128 random bits: the router takes a transfer's items only
from the connection that sent its first one (router.stream), and the id lets a reconnect
(a network blip) carry on as the same connection. With the cluster's CURVE keys the socket
is a CURVE client (kvtransfer.curve): it reaches only a router holding the cluster's server
key, proves the cluster's client key to it, and its messages are encrypted.

Used by the engine loop's thread alone (ZMQ sockets are not thread-safe). Sends never
block: a router that stopped reading for `max_queued` messages loses later ones (its
requests are aborted by then), counted in `num_dropped`. `close` lingers a second so the
last messages (final chunks, outcomes of a closing worker) still leave.

Life of a router endpoint (`unreachable`, called every loop turn with the endpoints the
live jobs name):
1. WATCHED      a socket connects to it (when a job first names it, not at its first
                message: a job waiting in a queue is watched too), with a monitor of its
                connection and ZMQ heartbeats (a ping every HEARTBEAT_IVL_S; no answer in
                HEARTBEAT_TIMEOUT_S drops the connection), so a router that dies or freezes
                is noticed, not only one whose process closed its socket.
2. DOWN         not connected: before its first handshake, or since a disconnect. ZMQ keeps
                reconnecting; a handshake makes it WATCHED again (a router that answers
                again within the grace period loses nothing).
3. GONE         DOWN for `grace_s`: `unreachable` returns it while jobs name it, and the job
                table ends those jobs (freeing all they hold: worker.base, Orphans). Their
                final messages stay queued on its socket for `retain_s` more, and reach
                the router if it is reached again (a partition that heals: its requests
                then fail at once instead of waiting for tokens); then the socket closes
                (`forget`), as it does for any endpoint no job names by then.
Bound: a router process that exits or is killed is GONE `grace_s` after its socket closed;
one that is frozen or cut off, at most HEARTBEAT_IVL_S + HEARTBEAT_TIMEOUT_S later. Time
is measured from when this thread read the event, so a worker that was itself stalled (a
long step, SIGSTOP) never counts its own pause against a router.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.kvtransfer.curve import CurveKeyring, secure_client
from pdserve.protocol import PrefillOutcome, PrefillReport, TokenBatch, TokenChunk
from pdserve.protocol.stream import encode

log = logging.getLogger(__name__)

# ZMQ heartbeats on the connection to each router: libzmq's I/O threads answer them, so a
# router whose event loop is busy still answers; only a stopped or unreachable one does not.
HEARTBEAT_IVL_S = 1.0
HEARTBEAT_TIMEOUT_S = 3.0
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


@dataclass
class _Link:
    sock: zmq.Socket | None  # None: ZMQ cannot connect to the endpoint (a malformed one)
    monitor: zmq.Socket | None
    down_since: float | None  # time.monotonic() it was last seen not connected; None: up


class StreamPublisher:
    def __init__(self, worker_id: str, grace_s: float = 5.0, retain_s: float = 60.0,
                 max_queued: int = 100_000, curve: CurveKeyring | None = None):
        self.worker_id = worker_id
        self._curve = curve
        self.grace_s = grace_s
        self.retain_s = retain_s
        self._ctx = zmq.Context.instance()
        self._max_queued = max_queued
        self._links: dict[str, _Link] = {}
        self._chunks: dict[str, list[TokenChunk]] = defaultdict(list)
        self._outcomes: dict[str, list[PrefillOutcome]] = defaultdict(list)
        self.num_dropped = 0

    def add_chunk(self, endpoint: str, chunk: TokenChunk) -> None:
        self._chunks[endpoint].append(chunk)

    def add_outcome(self, endpoint: str, outcome: PrefillOutcome) -> None:
        self._outcomes[endpoint].append(outcome)

    def flush(self) -> None:
        if not (self._chunks or self._outcomes):
            return
        now = time.time()
        for endpoint, chunks in self._chunks.items():
            self._send(endpoint, TokenBatch(self.worker_id, now, tuple(chunks)))
        for endpoint, outcomes in self._outcomes.items():
            self._send(endpoint, PrefillReport(self.worker_id, now, tuple(outcomes)))
        self._chunks.clear()
        self._outcomes.clear()

    @property
    def watched(self) -> set[str]:
        """The endpoints this worker has a socket to."""
        return set(self._links)

    def unreachable(self, endpoints: Collection[str]) -> list[str]:
        """Of `endpoints` (those the live jobs name; each is watched from now on), the ones
        GONE: not connected for `grace_s`. An endpoint no job names is forgotten once it has
        been down for `grace_s + retain_s`."""
        for endpoint in endpoints:
            self._link(endpoint)
        now = time.monotonic()
        gone = []
        for endpoint, link in list(self._links.items()):
            self._read_events(link, now)
            if link.down_since is None:
                continue
            down_s = now - link.down_since
            if endpoint in endpoints:
                if down_s >= self.grace_s:
                    gone.append(endpoint)
            elif down_s >= self.grace_s + self.retain_s:
                self.forget(endpoint)
        return gone

    def forget(self, endpoint: str) -> None:
        """Close the socket to `endpoint` and drop what is queued for it (its router is gone;
        a later message to it would connect afresh)."""
        self._chunks.pop(endpoint, None)
        self._outcomes.pop(endpoint, None)
        link = self._links.pop(endpoint, None)
        if link is not None:
            _close(link, linger_ms=0)

    def close(self) -> None:
        self.flush()
        for link in self._links.values():
            _close(link, linger_ms=1000)
        self._links.clear()

    def _send(self, endpoint: str, message: TokenBatch | PrefillReport) -> None:
        sock = self._link(endpoint).sock
        if sock is None:
            self.num_dropped += 1
            return
        try:
            sock.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            self.num_dropped += 1
            log.warning("stream to %s is full; dropped a message", endpoint)

    def _link(self, endpoint: str) -> _Link:
        link = self._links.get(endpoint)
        if link is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"w" + secrets.token_bytes(16))
            if self._curve is not None:
                secure_client(sock, self._curve)
            sock.setsockopt(zmq.SNDHWM, self._max_queued)
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
            monitor = sock.get_monitor_socket(_EVENTS)  # before connect: no event missed
            try:
                sock.connect(endpoint)
                link = _Link(sock, monitor, down_since=time.monotonic())
            except zmq.ZMQError as e:  # GONE at once: no router can be there
                log.error("cannot connect to stream endpoint %r: %s", endpoint, e)
                _close(_Link(sock, monitor, None), linger_ms=0)
                link = _Link(None, None, down_since=-float("inf"))
            self._links[endpoint] = link
        return link

    @staticmethod
    def _read_events(link: _Link, now: float) -> None:
        while link.monitor is not None:
            try:
                event = recv_monitor_message(link.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.down_since = None
            elif event == zmq.EVENT_DISCONNECTED and link.down_since is None:
                link.down_since = now


def _close(link: _Link, linger_ms: int) -> None:
    if link.sock is not None:
        link.sock.disable_monitor()
        link.monitor.close(linger=0)
        link.sock.close(linger=linger_ms)
