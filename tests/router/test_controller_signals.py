"""What a router tells the controller (router.controller.signals): requests that ended in
its window, the refusals and which side each was refused for, SLO misses; older ones
leave the window."""

from __future__ import annotations

from pdserve.router.controller.decide import RouterSignals
from pdserve.router.controller.signals import SignalWindow
from pdserve.router.observe import RequestOutcome, RequestRecord, Shortage


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def refused(short_of: Shortage | None) -> RequestRecord:
    return RequestRecord("r", RequestOutcome.REFUSED, 0.0, 0.0, 10, 0, slo_ttft_ms=500.0,
                         slo_tpot_ms=50.0, short_of=short_of)


def test_refusals_are_counted_with_the_side_they_were_refused_for_within_the_window():
    clock = Clock()
    window = SignalWindow(30.0, clock)
    window.request_ended(refused(Shortage.PREFILL))
    window.request_ended(refused(Shortage.DECODE))
    window.front_end_refused()
    # a refusal is no SLO miss: nothing ran
    assert window.signals(queued=2, queued_tokens=40) == RouterSignals(
        queued=2, queued_tokens=40, refused=3, refused_decode=1)
    window.request_ended(RequestRecord("f", RequestOutcome.FAILED, 0.0, 0.0, 10, 0,
                                       slo_tpot_ms=50.0))
    assert window.signals().tpot_misses == 1
    clock.now += 31
    assert window.signals() == RouterSignals()
