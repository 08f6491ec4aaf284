"""Work on a request that ends the moment its client goes away.

Starlette notices a client that left only when the next write fails, and then leaves the
response's generator suspended; the router would hold the request's KV on both workers
until the next token, or until the generator is collected. Here a watcher reads the
connection's `http.disconnect` and cancels the work at once: the router's `generate`
then aborts the request on both workers (router.router, CANCELLED).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first(work: Awaitable, receive: Receive):
    """`work`'s result, or None once the client disconnected (`work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        # cancelled work finishes its cleanup (the router's aborts) before we return
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def unless_disconnected(request: Request, work: Awaitable):
    """`work`'s result, or None if the client disconnected first. The request's body must
    have been read."""
    return await _first(work, request.receive)


class EventStream(StreamingResponse):
    """A server-sent event stream whose generator is cancelled and closed when the client
    disconnects."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator) as events:
            await _first(self._stream(events, send), receive)

    async def _stream(self, events: AsyncIterator[bytes], send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for data in events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between our reads of the connection
            return
