"""Placement by predicted cost in the simulated router, when its RouterConfig has a
`cost_profile`: the real router's own door and queue objects (router.door.Door,
router.queue.RouterQueue, with router.predict's Predictor on that profile) deciding on the
simulated workers (bench.sim.view), so each request gets the very decision a real router
would make on the same published loads.

Life of a request here:
1. `place` at intake: Door.place, as router.door's `route` calls it (no prefix hits: the
   simulator has no prefix cache). It refuses (predicted TTFT, plus the wait for a slot,
   past the TTFT SLO; predicted TPOT past the TPOT SLO; a local prefill stalling every
   worker), or returns the placement with the most SLO headroom: remote or local, which
   the request's line follows, and the workers its local prefill would stall past their
   SLO (passed over while others are listed).
2. `pick` at the head of its line: the workers the queue takes, as RouterQueue.wait does
   it: the serving workers of the roles the line needs, those to avoid left out while
   others remain, then RouterQueue's own choice among those with a free slot (and, for
   decode, the blocks), by predicted cost. `NO_PREFILL` when a remote request finds no
   serving prefill worker (they changed role): the real queue fails that attempt and the
   router dispatches it again, locally, at the head of its line.
The router keeps the door's interference book (charged at dispatch, by the predicted stall
`stall_s`) and its slot rate (bench.sim.view, ClockedSlots). What differs: the decision is
made on the simulated clock at once (a real router's placement costs the `router_s` the
profile charges at intake).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.bench.sim.view import ClockedSlots, SimView
from pdserve.protocol import WorkerRole
from pdserve.router.door import Door, Placed
from pdserve.router.errors import RequestError
from pdserve.router.placement import Slo
from pdserve.router.policy import Hint
from pdserve.router.predict import Predictor
from pdserve.router.queue import RouterQueue, preferring

NO_PREFILL = object()  # `pick`'s answer when a remote request has no prefill worker left


@dataclass(frozen=True)
class Ask:
    """What the door and the queue read of a request (router.validate's ValidRequest):
    its prompt's length, its hint and its SLOs."""

    prompt_token_ids: range
    hint: Hint = Hint.AUTO
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None


class _Queue(RouterQueue):
    """The real queue's placement over the simulated router's lines: their prompt tokens
    are the router's (`lines`: an object with `queued` and `tokens_of(disagg)`)."""

    def __init__(self, config, view: SimView, predictor: Predictor, lines):
        super().__init__(config, view, None, view, predictor)
        self.lines = lines

    def queued_tokens_of(self, disagg: bool) -> int:
        return self.lines.tokens_of(disagg)


class CostPlacement:
    def __init__(self, config, workers: list, loop, lines):
        """`config`: the router's RouterConfig, with a cost profile; `lines`: the simulated
        router's queue counts (`queued`, `tokens_of`)."""
        self.config = config
        self.predictor = Predictor(config.cost_profile)
        self.view = SimView(workers, lambda: loop.now)
        self.lines = lines
        self.queue = _Queue(config, self.view, self.predictor, lines)
        self.door = Door(config, self.view, self.queue, self.view, self.predictor)
        self.door.slots = ClockedSlots(loop)

    @property
    def book(self):
        return self.door.interference

    @property
    def slots(self) -> ClockedSlots:
        return self.door.slots

    def place(self, ask: Ask) -> tuple[Placed | None, RequestError | None]:
        """(the placement, None), or (None, the refusal or the bad request's error)."""
        self.queue.queued = self.lines.queued  # admission's slot wait reads it
        try:
            return self.door.place(ask, {}), None
        except RequestError as e:
            return None, e

    def slo(self, ask: Ask) -> Slo:
        return self.door.slo(ask)

    def pick(self, ask: Ask, disagg: bool, avoid: set[str], slo: Slo):
        """(decode SimWorker, prefill SimWorker or None) for the head of a line, None while
        no placement has a free slot, or NO_PREFILL (see the module)."""
        decode_roles = ((WorkerRole.DECODE,) if disagg
                        else (WorkerRole.COLOCATED, WorkerRole.DECODE))
        decodes = preferring(self.view.of_role(*decode_roles), avoid)
        if not decodes:
            return None  # the real queue fails it (no live worker); here it waits
        prefills = []
        if disagg:
            prefills = preferring(self.view.of_role(WorkerRole.PREFILL), avoid)
            if not prefills:
                return NO_PREFILL
        # the queue's own choice (router.queue): the one the real head would take
        picked = self.queue._place(ask, decodes, prefills, disagg, {}, slo)
        if picked is None:
            return None
        decode, prefill = picked
        return decode.handle, prefill.handle if prefill is not None else None

    def stall_s(self, w, prompt: int) -> float:
        """What a local prefill of `prompt` tokens on `w` stalls its decodes, as the door
        charges it to the interference book."""
        return self.door.stall_s(self.view.live(w), prompt)
