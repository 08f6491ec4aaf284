"""The cluster's controller in simulated time: router/controller/loop.py's turn, on the one
simulated router, calling the real rule (router.controller.decide).

Life: `start` schedules a turn every `interval_s` of simulated time while the run has
requests left. Each turn takes a snapshot as `Controller.snapshot` does from the registry:
every worker's role, state, `role_since`, adaptive flag and target, and its load as its
heartbeat last published it; the router's queue and, over the last `window_s`, the
requests that ended, the refusals and SLO attainment, counted by the real SignalWindow
(router.controller.signals) on the simulated clock from a RequestRecord made of each
simulated request. `decide` gives the moves; each is ordered to its worker (its target,
as written to Redis), which reads it at its next heartbeat, drains and switches
(bench.sim.switch). `switches` keeps every move ordered, with its time.

What differs: one router, so no election, lease or fencing; the snapshot sees a worker's
role and state as they stand (a real one, as of its last heartbeat). The simulated clock
starts at 0, so "no switch yet" is -inf here (0.0 in Unix time there), and workers took
their first roles before the run (bench.sim.switch), as the bench's start-up and warm-up
precede its measured runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bench.sim.request import SimRequest, State
from pdserve.protocol import WorkerRole
from pdserve.router.controller.decide import (
    ControllerConfig,
    Decision,
    Snapshot,
    WorkerInfo,
    decide,
)
from pdserve.router.controller.signals import SignalWindow
from pdserve.router.observe import RequestOutcome, RequestRecord

# added to the simulated times in a RequestRecord: router.final's timing takes a time of
# 0.0 for "never", and a request may arrive at 0.0 here
EPOCH = 1e6
_OUTCOMES = {State.FINISHED: RequestOutcome.FINISHED, State.REFUSED: RequestOutcome.REFUSED}


@dataclass(frozen=True)
class Switch:
    """A move the controller ordered."""

    time: float
    worker_id: str
    from_role: WorkerRole
    to_role: WorkerRole
    reason: str


class SimController:
    def __init__(self, config: ControllerConfig, loop, router, workers: list):
        """`router`: the SimRouter (its queue counts; it tells `ended` of every request
        that ends); `workers`: the SimWorkers."""
        self.config, self.loop, self.router, self.workers = config, loop, router, workers
        self.by_id = {w.worker_id: w for w in workers}
        self.window = SignalWindow(config.window_s, clock=lambda: loop.now)
        self.targets: dict[str, WorkerRole] = {}  # as Redis keeps them: the last ordered
        self.switches: list[Switch] = []
        self.last: Decision | None = None
        self._running: Callable[[], bool] = lambda: False
        router.observers.append(self.ended)

    def start(self, running: Callable[[], bool]) -> None:
        self._running = running
        self.loop.after(self.config.interval_s, self._turn)

    def ended(self, r: SimRequest) -> None:
        """A request ended: into the signal window, as the router's observer sees it."""
        outcome = _OUTCOMES.get(r.state, RequestOutcome.FAILED)
        finished = outcome is RequestOutcome.FINISHED
        slo = self.router.sent_slo
        self.window.request_ended(RequestRecord(
            str(r.idx), outcome, EPOCH + r.t_intake, EPOCH + r.t_end, r.prompt_len,
            r.output_len if finished else 0,
            ((EPOCH + r.t_first, 1),) if finished else (),
            slo_ttft_ms=slo.ttft_ms if slo else None, slo_tpot_ms=slo.tpot_ms if slo else None,
            short_of=r.short_of))

    def snapshot(self) -> Snapshot:
        workers = tuple(WorkerInfo(
            w.worker_id, w.role, w.state, w.adaptive, w.role_since,
            self.targets.get(w.worker_id), w.heartbeat.record[3], w.heartbeat.rate,
            w.heartbeat.record[1], w.heartbeat.record[2], w.heartbeat.record[0], w.num_blocks,
            w.heartbeat.step_s)
            for w in self.workers)
        signals = self.window.signals(self.router.queued, self.router.queued_tokens)
        last = self.switches[-1].time if self.switches else -math.inf
        return Snapshot(self.loop.now, workers, signals, last)

    def turn(self) -> Decision:
        """One decision, its moves ordered."""
        self.last = decision = decide(self.snapshot(), self.config)
        now = self.loop.now
        for move in decision.moves:
            self.targets[move.worker_id] = move.to_role
            self.by_id[move.worker_id].order(move.to_role)
            self.switches.append(Switch(now, move.worker_id, move.from_role, move.to_role,
                                        move.reason))
        return decision

    def _turn(self) -> None:
        self.turn()
        if self._running():
            self.loop.after(self.config.interval_s, self._turn)
