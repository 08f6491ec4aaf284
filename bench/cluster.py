"""What a deployment's workers hold, as its router reports them over the public API
(GetClusterStatus, from each worker's load report): whether the cluster went idle after a
run, and, if not, what it still holds (KV blocks, jobs, queued prefill tokens).

After a run every block must be free on every worker. The report is as fresh as the
workers' last heartbeat, so `wait_idle` polls for a while before it calls anything leaked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Held:
    """One worker's holdings as the router last saw them."""

    worker_id: str
    role: str
    kv_endpoint: str
    used_blocks: int  # total - free
    running: int
    waiting: int
    queued_prefill_tokens: int
    in_flight: int  # requests the router has on it

    @property
    def idle(self) -> bool:
        return not (self.used_blocks or self.running or self.waiting
                    or self.queued_prefill_tokens or self.in_flight)


@dataclass(frozen=True)
class IdleCheck:
    """The cluster after a run: idle within `waited_s`, or what it held when the wait ended."""

    idle: bool
    waited_s: float
    workers: tuple[Held, ...]

    @property
    def leaked_blocks(self) -> int:
        return sum(w.used_blocks for w in self.workers)

    def as_dict(self) -> dict:
        return {"idle": self.idle, "waited_s": self.waited_s,
                "leaked_blocks": self.leaked_blocks,
                "workers": [asdict(w) for w in self.workers]}


def held(workers: Iterable) -> tuple[Held, ...]:
    """`Held` of each `pb.WorkerStatus`."""
    return tuple(Held(w.worker_id, w.role, w.kv_endpoint, w.total_blocks - w.free_blocks,
                      w.running, w.waiting, w.queued_prefill_tokens, w.in_flight)
                 for w in workers)


async def cluster_status(target: str, timeout_s: float = 10.0) -> tuple[Held, ...]:
    """Every worker the router at `target` (gRPC HOST:PORT) knows."""
    from pdserve.rpc.client import PdServeClient

    async with PdServeClient(target) as client:
        status = await client.cluster_status(timeout=timeout_s)
    return held(status.workers)


async def wait_idle(target: str, timeout_s: float = 30.0, poll_s: float = 0.5) -> IdleCheck:
    """Poll until every worker holds nothing, or `timeout_s` passed (then the last view)."""
    start = time.monotonic()
    while True:
        workers = await cluster_status(target)
        waited = time.monotonic() - start
        if workers and all(w.idle for w in workers):
            return IdleCheck(True, waited, workers)
        if waited >= timeout_s:
            return IdleCheck(False, waited, workers)
        await asyncio.sleep(poll_s)
