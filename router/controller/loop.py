"""The cluster's controller, as each router runs it: every router campaigns for the lease
(router.controller.election) and publishes its own signals; the one that leads decides
(router.controller.decide) and orders the moves. A move is a target role in Redis, which
the worker's heartbeat reads and follows by draining and switching (deploy.heartbeat,
worker.switch).

Life of a controller, on the router's event loop:
1. `start()`: a task that turns every `config.interval_s`.
2. Each turn: publish this router's signals (its queue, the window of ended requests);
   campaign (take or renew the lease); read the recent switches, their totals and the
   lease's holder (what `describe` and the metrics show, on every router); if this one
   leads, take a snapshot (the view's workers, their targets, every router's signals),
   decide, and write each move, fenced by the lease (store.FENCED_SWITCH): a move a stale
   holder tries to write is dropped, and logged.
3. `close()`: the task ends and the lease is resigned, so another router takes over at once.
A turn that fails (Redis away) is logged once per outage and the next turn tries again; a
leader that cannot renew stops deciding before its lease can pass to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pdserve.protocol import WorkerRole
from pdserve.router.controller.decide import (
    ControllerConfig,
    Decision,
    Snapshot,
    WorkerInfo,
    decide,
)
from pdserve.router.controller.election import Election
from pdserve.router.controller.signals import SignalWindow
from pdserve.router.controller.store import (
    FENCED_SWITCH,
    LEASE,
    SWITCH_TOTALS,
    SWITCHES,
    SwitchEntry,
    publish_signals,
    read_signals,
    read_switch_totals,
    read_switches,
    read_targets,
    target_key,
    totals_field,
)
from pdserve.router.registry import RegistryErrors
from pdserve.router.view import ClusterView
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)
SHOWN_SWITCHES = 20  # what `pdserve status` lists


def controller_for(config, redis, view: ClusterView, queue, observers: list) -> Controller | None:
    """The controller of a router whose RouterConfig asks for one (it joins `observers`),
    else None."""
    if config.controller is None:
        return None
    controller = Controller(config.controller, config.router_id, redis, view, queue)
    observers.append(controller.window)
    return controller


class Controller:
    def __init__(self, config: ControllerConfig, router_id: str, redis, view: ClusterView,
                 queue):
        """`queue`: the router's queue (its `queued` and `queued_tokens` are signals)."""
        self.config = config
        self.router_id = router_id
        self.redis = redis
        self.view = view
        self.queue = queue
        self.window = SignalWindow(config.window_s)  # the router adds it to its observers
        self.election = Election(redis, router_id, config.lease_ttl_s)
        # the cluster's, as of the last turn: what status and metrics show
        self.switches: list[SwitchEntry] = []
        self.totals: dict[tuple[str, str], int] = {}
        self.holder: tuple[str, int] = ("", 0)
        self.last: Decision | None = None  # the last decision this router made, leading
        self._task: asyncio.Task | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.election.resign()

    @property
    def leads(self) -> bool:
        return self.election.leads

    async def turn(self) -> Decision | None:
        """One turn (the module's step 2); the decision when this router leads."""
        now = time.time()
        q = self.queue
        await publish_signals(self.redis, self.router_id,
                              self.window.signals(q.queued, q.queued_tokens), now,
                              self.config.lease_ttl_s)
        leads = await self.election.campaign()
        self.switches = await read_switches(self.redis, SHOWN_SWITCHES)
        self.totals = await read_switch_totals(self.redis)
        self.holder = await self.election.holder()
        if not leads:
            return None
        previous = self.last
        self.last = decision = decide(await self.snapshot(now), self.config)
        if previous is None or previous.why != decision.why:
            # each change of conclusion, so a log tells why the controller held or moved
            log.info("controller (epoch %d): prefill pressure %.2f, decode %.2f: %s",
                     self.election.epoch, decision.pressures.prefill,
                     decision.pressures.decode, decision.why)
        else:
            log.debug("controller: prefill pressure %.2f, decode %.2f",
                      decision.pressures.prefill, decision.pressures.decode)
        for move in decision.moves:
            entry = SwitchEntry(now, move.worker_id, move.from_role.value, move.to_role.value,
                                move.reason, self.election.epoch)
            written = await self.redis.eval(
                FENCED_SWITCH, 4, LEASE, target_key(move.worker_id), SWITCHES, SWITCH_TOTALS,
                self.election.lease_value, move.to_role.value, self.election.epoch,
                move.reason, now, entry.to_json(), self.config.history,
                totals_field(move.from_role.value, move.to_role.value))
            if written:
                log.warning("controller (epoch %d): worker %s %s -> %s: %s",
                            self.election.epoch, move.worker_id, move.from_role.value,
                            move.to_role.value, move.reason)
            else:
                log.warning("controller %s: the switch of %s was fenced off (the lease is "
                            "no longer epoch %d's)", self.router_id, move.worker_id,
                            self.election.epoch)
        return decision

    async def snapshot(self, now: float) -> Snapshot:
        records = [w.record for w in self.view.workers.values()]
        targets = await read_targets(self.redis, [r.worker_id for r in records if r.adaptive])
        workers = tuple(WorkerInfo(
            r.worker_id, r.role, r.state, r.adaptive, r.role_since,
            targets[r.worker_id].role if r.worker_id in targets else None,
            r.queued_prefill_tokens, r.prefill_tokens_per_s, r.running, r.waiting,
            r.free_blocks, r.total_blocks, r.decode_step_s, r.prefill_stall_s)
            for r in records)
        last = self.switches[0].time if self.switches else 0.0
        return Snapshot(now, workers, await read_signals(self.redis), last)

    def describe(self, status: pb.ClusterStatus) -> pb.ClusterStatus:
        """`status` with the controller's holder and the recent switches added."""
        status.controller, status.controller_epoch = self.holder
        status.role_switches.extend(
            pb.RoleSwitch(time=e.time, worker_id=e.worker, from_role=e.from_role,
                          to_role=e.to_role, reason=e.reason, epoch=e.epoch)
            for e in self.switches)
        return status

    def per_role(self) -> dict[tuple[WorkerRole, str], int]:
        """Adaptive workers in the view by (role, state)."""
        out: dict[tuple[WorkerRole, str], int] = {}
        for w in self.view.workers.values():
            if w.record.adaptive:
                key = (w.record.role, w.record.state.value)
                out[key] = out.get(key, 0) + 1
        return out

    async def _run(self) -> None:
        while True:
            try:
                await self.turn()
                if self._failing:
                    log.warning("controller %s: Redis answers again", self.router_id)
                self._failing = False
            except RegistryErrors as e:
                if not self._failing:
                    log.warning("controller %s: a turn failed (%s); trying every %gs",
                                self.router_id, e, self.config.interval_s)
                self._failing = True
            except Exception:  # noqa: BLE001 - a bug must not end the controller silently
                log.exception("controller %s: a turn failed", self.router_id)
            await asyncio.sleep(self.config.interval_s)
