"""How the router reaches a worker: a small async protocol. `deploy/` implements it with Ray
actor calls or calls into worker objects (in this process or a child process); the router
never imports a worker.

Contract:
- `reserve` returns a Reservation: the decode worker's KV endpoint and how many leading
  prompt tokens its prefix cache holds for the job (the prefill order's `kv_start`: they
  are not sent), or raises NoRoom (no free blocks now: nothing is held) or ValueError (a
  bad order: nothing is held).
- `generate` starts a local prefill + decode on a decode or colocated worker.
- `submit` returns once the prefill worker queued the job; its outcome comes later, on the
  router's stream endpoint (the order's `notify_endpoint`). It returns True when the order
  re-sends the KV of the held job its `resend_of` names (nothing is computed again), False
  when the prompt is computed.
- No call waits for an engine step or stays open for a job's life.
- `reserve`, `generate` and `submit` raise NotServing when the worker takes no such order
  now (it drains before a role switch, or serves another role): nothing is held.
- `abort` is idempotent and never raises for an unknown id, a dead or a hung worker.
- Any other call raises WorkerGone when the worker cannot be reached (dead process, lost
  actor, closed worker) or does not answer within the call timeout (a hung worker; the
  `--worker-call-timeout` flag, deploy.handles).
- Every call returns or raises within the call timeout.
Tokens and outcomes never come back through a handle: workers push them to the router's
stream endpoint.
"""

from __future__ import annotations

from typing import Protocol

from pdserve.protocol import DecodeOrder, PrefillOrder, Reservation


class NoRoom(Exception):
    """The decode worker has no free KV blocks for this prompt right now."""


class NotServing(Exception):
    """The worker takes no order of this kind now (it drains, or changed role)."""


class WorkerGone(Exception):
    """The worker could not be reached."""


class DecodeHandle(Protocol):
    async def reserve(self, order: DecodeOrder) -> Reservation: ...

    async def generate(self, order: DecodeOrder) -> None: ...

    async def abort(self, transfer_id: str) -> None: ...


class PrefillHandle(Protocol):
    async def submit(self, order: PrefillOrder) -> bool: ...

    async def abort(self, transfer_id: str) -> None: ...
