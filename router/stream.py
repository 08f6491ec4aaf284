"""The router's end of the token stream: a ZMQ PULL socket the decode workers push to.

The wire format is the decode worker's (`decode_worker/stream.py`, which the router may not
import): msgpack `[version, worker_id, time, [[transfer_id, [ids], finish, error, stamps]]]`,
stamps in DecodeStamps field order. A test checks this reader against that writer.
Each chunk goes to the asyncio queue registered for its transfer id; chunks for ids nobody
waits for (an aborted request's tail) are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgpack
import zmq
import zmq.asyncio

STREAM_VERSION = 1
STAMP_FIELDS = ("received", "prefill_start", "prefill_end", "kv_received", "decode_admitted",
                "first_token", "finished")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamChunk:
    worker_id: str
    time: float
    transfer_id: str
    token_ids: tuple[int, ...]
    finish: str | None  # "stop" | "length" | "abort" | "error" on the last chunk
    error: str
    stamps: dict[str, float] | None  # STAMP_FIELDS, on the last chunk


def decode_batch(data: bytes) -> list[StreamChunk]:
    """Raises ValueError for anything but a batch of this version."""
    try:
        version, worker_id, t, chunks = msgpack.unpackb(data)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"malformed token stream message: {e}") from e
    if version != STREAM_VERSION:
        raise ValueError(f"token stream version {version!r}, expected {STREAM_VERSION}")
    try:
        return [StreamChunk(str(worker_id), float(t), str(tid), tuple(int(x) for x in ids),
                            None if finish is None else str(finish), str(error),
                            None if stamps is None else dict(zip(STAMP_FIELDS, map(float, stamps),
                                                                 strict=True)))
                for tid, ids, finish, error, stamps in chunks]
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"malformed token stream message: {e}") from e


class TokenStreamReader:
    """Binds `tcp://HOST:*`; `endpoint` is what decode jobs name."""

    def __init__(self, host: str = "127.0.0.1"):
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{host}:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._queues: dict[str, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def open(self, transfer_id: str) -> asyncio.Queue:
        """Register a queue before the job is dispatched, so no chunk can arrive unseen."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues[transfer_id] = q
        return q

    def close_queue(self, transfer_id: str) -> None:
        self._queues.pop(transfer_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._sock.close()

    async def _run(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                chunks = decode_batch(data)
            except ValueError as e:
                log.error("dropped a token stream message: %s", e)
                continue
            for chunk in chunks:
                q = self._queues.get(chunk.transfer_id)
                if q is not None:
                    q.put_nowait(chunk)
