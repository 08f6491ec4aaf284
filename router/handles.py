"""How the router reaches a worker: a small async protocol. `deploy/` implements it with Ray
actor calls; tests with worker objects in this process or in child processes.

Contract:
- `reserve` returns the decode worker's KV endpoint, or raises NoRoom (no free blocks now:
  nothing is held) or ValueError (a bad job: nothing is held).
- `generate` starts a local prefill + decode on a decode or colocated worker.
- `prefill` returns once the prefill job is DONE, FAILED or ABORTED.
- `abort` is idempotent and never raises for an unknown id.
- Any call raises WorkerGone when the worker cannot be reached (dead process, lost actor).
Tokens never come back through a handle: the decode worker pushes them to the router's
token-stream endpoint.
"""

from __future__ import annotations

from typing import Protocol

from pdserve.router.jobs import DecodeOrder, PrefillOrder, PrefillOutcome


class NoRoom(Exception):
    """The decode worker has no free KV blocks for this prompt right now."""


class WorkerGone(Exception):
    """The worker could not be reached."""


class DecodeHandle(Protocol):
    async def reserve(self, order: DecodeOrder) -> str: ...

    async def generate(self, order: DecodeOrder) -> None: ...

    async def abort(self, transfer_id: str) -> None: ...


class PrefillHandle(Protocol):
    async def prefill(self, order: PrefillOrder) -> PrefillOutcome: ...

    async def abort(self, transfer_id: str) -> None: ...
