"""A simulated worker's role switch (mixed into SimWorker), as worker/switch.py and
deploy/heartbeat.py make a real adaptive worker's.

Life of a switch:
1. ORDERED    the controller sets the worker's target (`order`), as it writes it to Redis.
2. DRAINING   at the worker's next heartbeat it reads the target and begins to drain, as
              deploy/heartbeat.py passes a new target on: from then on it takes no new
              order (the router leaves it out at once, as a real one does after the first
              NotServing), and the jobs it holds run to their end as usual: its decodes
              finish, a prefill job's KV reaches its decode worker, a reservation waits for
              its KV. An order back to the present role ends the drain.
3. SWITCHED   once it holds nothing (nothing queued or computing, no decode, every block
              free: the real switch's test on the engine and the job table), it takes the
              new role, SERVING, `role_since` now, and `on_switched` tells the router.
What differs: the switch itself costs no simulated time (the real one rebuilds the job
table on the same engine in milliseconds), and the drain timeout (a real worker ends the
jobs still live after `drain_timeout_s`) is not modelled: every simulated job ends by itself.
Uses the worker's `role`, `loop`, `busy`, `waiting`, `prefilling`, `arrived`, `decoding`
and `used_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pdserve.protocol import WorkerRole, WorkerState


class Switching:
    adaptive = False  # the controller may change its role
    state = WorkerState.SERVING
    target: WorkerRole | None = None  # the role it drains toward
    ordered: WorkerRole | None = None  # the controller's target, read at the next heartbeat
    # it took its first role before the run (the deployment's start-up and warm-up), so the
    # controller's dwell does not hold it at the start
    role_since = -math.inf
    switches = 0
    on_switched: Callable[[Switching, WorkerRole], None] = staticmethod(lambda w, old: None)

    @property
    def serving(self) -> bool:
        return self.state is WorkerState.SERVING

    def order(self, target: WorkerRole) -> None:
        """The controller wants the worker in `target`; it follows at its next heartbeat."""
        self.ordered = target

    def read_order(self) -> None:
        """(the heartbeat) Follow a target the worker has not followed yet."""
        target, self.ordered = self.ordered, None
        if target is None or target is (self.target or self.role):
            return
        if target is self.role:  # the drain is called off
            self.state, self.target = WorkerState.SERVING, None
            self.on_switched(self, self.role)
            return
        self.state, self.target = WorkerState.DRAINING, target
        self.on_switched(self, self.role)  # the router leaves it out from now on
        self.drained()

    def holds_nothing(self) -> bool:
        return not (self.busy or self.waiting or self.prefilling or self.arrived
                    or self.decoding.size or self.used_blocks)

    def drained(self) -> None:
        """Something ended on the worker: switch if it drains and holds nothing now."""
        if self.state is not WorkerState.DRAINING or not self.holds_nothing():
            return
        old = self.role
        self.role, self.target = self.target, None
        self.state = WorkerState.SERVING
        self.role_since = self.loop.now
        self.switches += 1
        self.on_switched(self, old)
