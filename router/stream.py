"""The router's end of the worker stream (protocol.stream): one ZMQ PULL socket that decode
and colocated workers push tokens to and prefill workers push outcomes to.

Each TokenChunk and PrefillOutcome goes to the asyncio queue registered for its transfer
id; items for ids nobody waits for (an aborted request's tail, the outcome of a prefill
whose request already ended) are dropped. A malformed message is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from pdserve.protocol import TokenBatch
from pdserve.protocol.stream import decode

log = logging.getLogger(__name__)


class StreamReader:
    """Binds `tcp://HOST:*`; `endpoint` is what the router's orders name."""

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
        """Register a queue before the job is dispatched, so no item can arrive unseen."""
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
                message = decode(data)
            except ValueError as e:
                log.error("dropped a stream message: %s", e)
                continue
            items = message.chunks if isinstance(message, TokenBatch) else message.outcomes
            for item in items:
                q = self._queues.get(item.transfer_id)
                if q is not None:
                    q.put_nowait(item)
