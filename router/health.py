"""The router's gRPC health, judged from its view of the cluster (router.view, which each
registry refresh updates) every `period_s` until the server stops.

Statuses of the standard health service:
- `""` and `pdserve.v1.PdServe`: SERVING while a worker that can decode (decode or
  colocated) is live, NOT_SERVING while none is: then every request would fail with
  UNAVAILABLE.
- `pdserve.v1.PdServe/<role>` for each role the deployment has (`roles`): SERVING while a
  worker of that role is live, NOT_SERVING while none is.
Why the whole service stays SERVING while every prefill worker is gone: decode workers then
prefill prompts themselves (policy.should_disaggregate), so only requests that demand
disaggregation (ALWAYS) fail; and since every router reads the same registry, a load
balancer would drop them all at once, making a degraded cluster a dead one. The role's own
status says that it is degraded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable

from grpc_health.v1 import health_pb2

from pdserve.protocol import WorkerRole
from pdserve.router.view import ClusterView

log = logging.getLogger(__name__)
DECODERS = (WorkerRole.DECODE, WorkerRole.COLOCATED)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks


def role_service(service: str, role: WorkerRole) -> str:
    """The health service name of one role's pool."""
    return f"{service}/{role.value}"


def serving(live: Collection[WorkerRole], service: str,
            roles: Iterable[WorkerRole]) -> dict[str, bool]:
    """Each health service name and whether it is SERVING, given the roles of the live
    workers."""
    can_decode = any(role in live for role in DECODERS)
    out = {"": can_decode, service: can_decode}
    out.update({role_service(service, role): role in live for role in roles})
    return out


class HealthReporter:
    """Sets `servicer`'s statuses from `view`; only changes are set (and logged)."""

    def __init__(self, servicer, view: ClusterView, service: str,
                 roles: Iterable[WorkerRole], period_s: float):
        self._servicer = servicer
        self._view = view
        self._service = service
        self._roles = tuple(roles)
        self._period_s = period_s
        self._last: dict[str, bool] = {}

    async def update(self) -> None:
        live = {w.record.role for w in self._view.workers.values()}
        for name, ok in serving(live, self._service, self._roles).items():
            if self._last.get(name) == ok:
                continue
            if name and name in self._last:  # "" says the same as the service
                log.log(logging.INFO if ok else logging.ERROR, "health of %s: %s", name,
                        "SERVING" if ok else "NOT_SERVING (no live worker)")
            self._last[name] = ok
            await self._servicer.set(name, _SERVING if ok else _NOT_SERVING)

    def start(self, server) -> None:
        """Keep the statuses current until `server` (a grpc.aio.Server) terminates."""
        task = asyncio.get_running_loop().create_task(self._run(server))
        _running.add(task)
        task.add_done_callback(_running.discard)

    async def _run(self, server) -> None:
        stopped = asyncio.ensure_future(server.wait_for_termination())
        try:
            while True:
                done, _ = await asyncio.wait({stopped}, timeout=self._period_s)
                if done:
                    return
                try:
                    await self.update()
                except Exception:  # noqa: BLE001 - a report failed; the next one may not
                    log.exception("health update failed")
        finally:
            stopped.cancel()
