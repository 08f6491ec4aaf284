"""A worker's end of the stream to the routers (protocol.stream): one ZMQ PUSH socket per
router endpoint, and at most one message per engine step, kind and endpoint.

Used by the engine loop's thread alone (ZMQ sockets are not thread-safe). Sends never
block: a router that stopped reading for `max_queued` messages loses later ones (its
requests are aborted by then), counted in `num_dropped`. `close` lingers a second so the
last messages (final chunks, outcomes of a closing worker) still leave.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import zmq

from pdserve.protocol import PrefillOutcome, PrefillReport, TokenBatch, TokenChunk
from pdserve.protocol.stream import encode

log = logging.getLogger(__name__)


class StreamPublisher:
    def __init__(self, worker_id: str, max_queued: int = 100_000):
        self.worker_id = worker_id
        self._ctx = zmq.Context.instance()
        self._max_queued = max_queued
        self._sockets: dict[str, zmq.Socket] = {}
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

    def close(self) -> None:
        self.flush()
        for sock in self._sockets.values():
            sock.close(linger=1000)
        self._sockets.clear()

    def _send(self, endpoint: str, message: TokenBatch | PrefillReport) -> None:
        try:
            self._socket(endpoint).send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            self.num_dropped += 1
            log.warning("stream to %s is full; dropped a message", endpoint)

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, self._max_queued)
            sock.connect(endpoint)
            self._sockets[endpoint] = sock
        return sock
