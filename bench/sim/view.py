"""The simulated workers as the real router's own objects see them, so that its door and
queue (router.door, router.queue, router.placement) decide on them unchanged: a
WorkerRecord per worker made from what its heartbeat last published (free blocks, running,
waiting, queued prefill tokens, prefill rate, decode step time) and its role and state as
they stand, a LiveWorker around it whose `in_flight` counts the router's requests there,
a ClusterView's `of_role`, the ledger's `tokens` and `sent` (the prompt tokens the router
sent each worker whose first token has not come, and when), and admission's SlotRate on
the simulated clock.

A record is made again only when what it is made of changed (the router asks for every
worker's on every placement). What differs from the registry: the records carry no
endpoints, prefix-cache counts or leases (the simulator has none of them), and a role or
state change is seen at once (a real router sees it at its next refresh, or when the
worker refuses an order).
"""

from __future__ import annotations

from collections.abc import Callable

from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.admission import SlotRate
from pdserve.router.view import LiveWorker


class _InFlight:
    """`len()`: the router's requests on the worker (all LiveWorker's readers ask of it)."""

    __slots__ = ("worker",)

    def __init__(self, worker):
        self.worker = worker

    def __len__(self) -> int:
        return self.worker.in_flight


class SimView:
    def __init__(self, workers: list, clock: Callable[[], float] = lambda: 0.0):
        """`workers`: the SimWorkers of the run; `clock`: the simulated time."""
        self.workers = workers
        self.clock = clock
        self.by_id = {w.worker_id: w for w in workers}
        self._live = {w.worker_id: LiveWorker(record_of(w), w, _InFlight(w)) for w in workers}
        self._made_of: dict[str, tuple] = {}

    def live(self, w) -> LiveWorker:
        """`w` as a LiveWorker, its record as its last heartbeat and its role say now."""
        hb = w.heartbeat
        key = (hb.record, hb.rate, hb.step_s, w.role, w.state, w.role_since)
        live = self._live[w.worker_id]
        if self._made_of.get(w.worker_id) != key:
            self._made_of[w.worker_id] = key
            live.record = record_of(w)
        return live

    def of_role(self, *roles: WorkerRole) -> list[LiveWorker]:
        """ClusterView.of_role: the workers of `roles` that take new orders."""
        return [self.live(w) for w in self.workers if w.role in roles and w.serving]

    def tokens(self, worker_id: str) -> int:
        """PrefillLedger.tokens: prompt tokens sent to the worker, no first token yet."""
        return self.by_id[worker_id].sent_tokens

    def sent(self, worker_id: str) -> tuple[tuple[float, int], ...]:
        """PrefillLedger.sent: (seconds since sent, prompt tokens) of each, oldest first."""
        now = self.clock()
        return tuple((now - t, n) for t, n in self.by_id[worker_id].sent.values())


def record_of(w) -> WorkerRecord:
    """The registry record a SimWorker's last heartbeat would have written."""
    free, running, waiting, queued = w.heartbeat.record
    return WorkerRecord(
        w.worker_id, w.role, "sim", "", w.block_size, w.num_blocks, free, running, waiting,
        queued, 0.0, 0.0, prefill_tokens_per_s=w.heartbeat.rate,
        decode_step_s=w.heartbeat.step_s, chunk_tokens=w.budget, state=w.state,
        adaptive=w.adaptive, role_since=w.role_since)


class ClockedSlots(SlotRate):
    """Admission's SlotRate, its default time the simulated clock's."""

    def __init__(self, loop):
        super().__init__()
        self.loop = loop

    def released(self, queue_waiting: bool, now: float | None = None) -> None:
        super().released(queue_waiting, self.loop.now if now is None else now)

    def per_s(self, now: float | None = None) -> float | None:
        return super().per_s(self.loop.now if now is None else now)
