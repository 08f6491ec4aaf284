"""A simulated worker's load reports, as its heartbeat thread publishes them: every
`period_s` of simulated time from a phase, while the run has requests left, the worker's
load (free blocks, running, waiting, queued prefill tokens) and its meters (prefill rate,
decode step time). The router sees only the last report (plus its own counts); a report
that changed nothing is not passed on. `without_room` marks the worker full until the next
report, as WorkerRecord.without_room does after a refused reservation. A beat also reads
the worker's target role, if the controller set a new one (bench.sim.switch).
"""

from __future__ import annotations

from collections.abc import Callable


class Heartbeat:
    def __init__(self, worker, period_s: float):
        """`worker`: a SimWorker (its `published()` and `on_change` hook)."""
        self.worker, self.period_s = worker, period_s
        self.record = (worker.num_blocks, 0, 0, 0)  # free, running, waiting, queued tokens
        self.rate = 0.0  # the prefill rate it last published
        self.step_s = 0.0  # the decode step time it last published
        self._running: Callable[[], bool] = lambda: False

    def start(self, phase_s: float, running: Callable[[], bool]) -> None:
        self._running = running
        self.worker.loop.at(phase_s, self._beat)

    def publish_meters(self, rate: float, step_s: float) -> None:
        self.rate, self.step_s = rate, step_s

    def without_room(self) -> None:
        self.record = (0, *self.record[1:])

    def _beat(self) -> None:
        if self.worker.ordered is not None:  # a controller's target, read as a beat does
            self.worker.read_order()
        record, meters = self.worker.published()
        if record != self.record or meters != (self.rate, self.step_s):
            self.record = record
            self.rate, self.step_s = meters
            self.worker.on_change(self.worker)
        if self._running():
            self.worker.loop.after(self.period_s, self._beat)
