"""The router's handle over a worker (router.handles): the worker object in this process, a
`deploy.local` proxy to a child process, or a Ray actor. How a call is made is passed in:
in a thread (`ThreadCalls`, for objects and proxies) or as an actor call
(`deploy.ray_actors.RayCalls`). Orders and outcomes are the contract's own types
(pdserve.protocol), so nothing is translated; only errors are mapped to the router's.
"""

from __future__ import annotations

import asyncio

from pdserve.engine import NoFreeBlocksError
from pdserve.protocol import DecodeOrder, PrefillOrder, WorkerRecord
from pdserve.router.handles import NoRoom, WorkerGone


class ThreadCalls:
    """Calls a worker object's method in a thread (the object, or a `deploy.local` proxy).
    Every worker call returns quickly (none waits for a step or a job), so the default
    thread pool is not held by long calls."""

    # what a dead process, a closed manager connection or a closed worker raise
    gone: tuple[type[BaseException], ...] = (ConnectionError, EOFError, OSError, RuntimeError)

    async def __call__(self, method, arg):
        return await asyncio.to_thread(method, arg)


class WorkerHandle:
    """Implements both router.handles.DecodeHandle and PrefillHandle over `target`; the
    router calls only what the worker's role offers."""

    def __init__(self, target, worker_id: str, calls=None):
        self.target = target
        self.worker_id = worker_id
        self._calls = calls or ThreadCalls()

    async def reserve(self, order: DecodeOrder) -> str:
        return await self._call(self.target.reserve, order)

    async def generate(self, order: DecodeOrder) -> None:
        await self._call(self.target.generate, order)

    async def submit(self, order: PrefillOrder) -> None:
        await self._call(self.target.submit, order)

    async def abort(self, transfer_id: str) -> None:
        try:
            await self._call(self.target.abort, transfer_id)
        except WorkerGone:
            pass  # a dead worker holds nothing

    async def _call(self, method, arg):
        try:
            return await self._calls(method, arg)
        except NoFreeBlocksError as e:  # before `gone`: it is a RuntimeError
            raise NoRoom(str(e)) from e
        except ValueError:
            raise
        except self._calls.gone as e:
            raise WorkerGone(f"{self.worker_id}: {e!r}") from e


def handle_for(record: WorkerRecord, target, calls=None) -> WorkerHandle:
    """The router's handle over the worker `record` describes."""
    return WorkerHandle(target, record.worker_id, calls)
