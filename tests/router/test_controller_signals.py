"""What a router tells the controller (router.controller.signals): requests that ended in
its window, the refusals and which side each was refused for, SLO misses; older ones
leave the window."""

from __future__ import annotations

from pdserve.router.controller.decide import RouterSignals
from pdserve.router.controller.signals import SignalWindow
from pdserve.router.observe import RequestOutcome, RequestRecord, Shortage
from pdserve.rpc import pdserve_pb2 as pb


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


def finished(first_token_ms: float, decode_ms: float, slo_ttft_ms: float) -> RequestRecord:
    """`decode_ms`: what the first token waited for on the decode side (the KV's transfer
    and its admission)."""
    final = pb.FinalResponse(decode_worker="d")
    t = final.timing
    t.first_token_ms, t.kv_transfer_ms, t.decode_queue_ms = (
        first_token_ms, decode_ms / 2, decode_ms / 2)
    t.router_queue_ms = first_token_ms - decode_ms  # a slot of either role: neither side
    t.decode_ms = 100.0
    final.usage.completion_tokens = 3
    return RequestRecord("f", RequestOutcome.FINISHED, 0.0, 1.0, 10, 3, final=final,
                         slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=100.0)


def test_a_ttft_miss_is_the_decode_sides_when_its_wait_went_mostly_elsewhere():
    window = SignalWindow(30.0, Clock())
    window.request_ended(finished(900.0, 200.0, 500.0))  # missed waiting elsewhere
    window.request_ended(finished(900.0, 700.0, 500.0))  # missed waiting for decode
    window.request_ended(finished(300.0, 200.0, 700.0))  # met
    s = window.signals()
    assert (s.ttft_requests, s.ttft_misses, s.ttft_misses_decode) == (3, 2, 1)
    # the SLOs asked for, summed for the controller's mean
    assert (s.ttft_slo_ms_sum, s.tpot_requests, s.tpot_slo_ms_sum) == (1700, 3, 300)


def test_prompt_work_counts_the_tokens_computed_not_those_a_prefix_cache_served():
    clock = Clock()
    window = SignalWindow(30.0, clock)
    done = finished(300.0, 100.0, 700.0)  # 10 prompt tokens
    done.final.usage.cached_prompt_tokens = 4
    window.request_ended(done)
    window.request_ended(refused(Shortage.PREFILL))  # nothing computed
    window.request_ended(RequestRecord("c", RequestOutcome.CANCELLED, 0.0, 0.0, 7, 0))
    assert window.signals().prompt_tokens == 6 + 7  # no final: all of it may have run
    clock.now += 31
    assert window.signals().prompt_tokens == 0
