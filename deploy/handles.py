"""The router's handle over a worker (router.handles): the worker object in this process, a
`deploy.local` proxy to a child process, or a Ray actor. How a call is made is passed in:
in a thread (`ThreadCalls`, for objects and proxies) or as an actor call
(`deploy.ray_actors.RayCalls`). Orders and outcomes are the contract's own types
(pdserve.protocol), so nothing is translated; only errors are mapped to the router's.

Timeouts: every call waits at most `timeout_s` (the `--worker-call-timeout` flag). Worker
calls only hand an order to the worker's loop (none waits for a step), so a call that does
not answer in that time is a worker that hangs (stopped, wedged, cut off): the call raises
WorkerGone, which the router turns into UNAVAILABLE and a drop from its view. What happens
to the call itself:
- an order (`reserve`, `generate`, `submit`) still waiting for a thread is withdrawn; one
  already sent may still be applied when the worker answers again, and is then ended by the
  router's abort (a worker ends an order whose abort came first: worker.base, Tombstones);
- an `abort` is never withdrawn: it reaches the worker when it answers again, so the job's
  blocks are freed then. `abort` itself returns within the timeout and never raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pdserve.deploy.call_pool import CallPool
from pdserve.engine import NoFreeBlocksError
from pdserve.protocol import DecodeOrder, PrefillOrder, Reservation, WorkerRecord
from pdserve.router.handles import NoRoom, NotServing, WorkerGone
from pdserve.worker.switch import NotServing as WorkerNotServing

DEFAULT_CALL_TIMEOUT_S = 5.0


class CallTimeout(TimeoutError):
    """The worker did not answer a call in time."""


class ThreadCalls:
    """Calls a worker object's method in a thread (the object, or a `deploy.local` proxy).

    Each handle has its own small pool of threads (deploy.call_pool), not asyncio's default
    executor: a proxy call to a stopped process blocks its thread until the process runs
    again or dies, and a few such calls must not starve every other worker's calls (nor
    the router's other blocking work) of threads. A worker that hangs holds at most
    `threads` of them; later calls to it wait for one and time out like the rest."""

    # what a dead process, a closed manager connection or a closed worker raise
    gone: tuple[type[BaseException], ...] = (ConnectionError, EOFError, OSError, RuntimeError)

    def __init__(self, timeout_s: float = DEFAULT_CALL_TIMEOUT_S, threads: int = 8,
                 name: str = "worker"):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._pool = CallPool(name, threads)

    def warm(self, method: Callable[[], Any]) -> None:
        """Make `method()` once on a pool thread, not waiting for it: that thread opens its
        connection to the worker now, not on the first request. Errors are dropped (a
        worker that is gone shows on the next real call)."""
        self._pool.submit(method)

    @property
    def pool(self) -> CallPool:
        return self._pool

    async def __call__(self, method: Callable[[Any], Any], arg: Any, withdraw: bool = True):
        """`method(arg)` in a pool thread, waiting at most `timeout_s` (CallTimeout). With
        `withdraw` False the call still runs once a thread is free, after a timeout."""
        call = asyncio.wrap_future(self._pool.submit(method, arg))
        if not withdraw:
            call = asyncio.shield(call)
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except TimeoutError:
            raise CallTimeout(f"no answer within {self.timeout_s:g}s") from None


class WorkerHandle:
    """Implements both router.handles.DecodeHandle and PrefillHandle over `target`; the
    router calls only what the worker's role offers."""

    def __init__(self, target, worker_id: str, calls=None):
        self.target = target
        self.worker_id = worker_id
        self._calls = calls or ThreadCalls(name=worker_id)

    async def reserve(self, order: DecodeOrder) -> Reservation:
        return await self._call(self.target.reserve, order)

    async def generate(self, order: DecodeOrder) -> None:
        await self._call(self.target.generate, order)

    async def submit(self, order: PrefillOrder) -> bool:
        return await self._call(self.target.submit, order)

    async def abort(self, transfer_id: str) -> None:
        try:
            await self._call(self.target.abort, transfer_id, withdraw=False)
        except WorkerGone:
            pass  # a dead worker holds nothing; a hung one gets the abort when it resumes

    async def _call(self, method, arg, withdraw: bool = True):
        try:
            return await self._calls(method, arg, withdraw=withdraw)
        except NoFreeBlocksError as e:  # before `gone`: it is a RuntimeError
            raise NoRoom(str(e)) from e
        except WorkerNotServing as e:  # before `gone`: it is a RuntimeError
            raise NotServing(str(e)) from e
        except ValueError:
            raise
        except CallTimeout as e:  # before `gone`: it is an OSError
            raise WorkerGone(f"{self.worker_id}: {e}") from e
        except self._calls.gone as e:
            raise WorkerGone(f"{self.worker_id}: {e!r}") from e


def handle_for(record: WorkerRecord, target, calls=None) -> WorkerHandle:
    """The router's handle over the worker `record` describes; `calls` defaults to
    ThreadCalls with the default timeout."""
    return WorkerHandle(target, record.worker_id, calls)
