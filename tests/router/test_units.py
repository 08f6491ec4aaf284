"""Pure parts of the router: its routing policies."""

from __future__ import annotations

from pdserve.router.policy import (
    Hint,
    WorkerLoad,
    choose_decode,
    choose_prefill,
    round_robin,
    should_disaggregate,
)


def load(wid, free=100, running=0, waiting=0, queued=0, in_flight=0, block_size=16):
    return WorkerLoad(wid, free, 100, block_size, running, waiting, queued, in_flight)


def test_disaggregation_follows_the_hint_and_the_threshold():
    assert should_disaggregate(Hint.ALWAYS, 5, 128, True)
    assert not should_disaggregate(Hint.NEVER, 5000, 128, True)
    assert should_disaggregate(Hint.AUTO, 128, 128, True)
    assert not should_disaggregate(Hint.AUTO, 127, 128, True)
    assert not should_disaggregate(Hint.ALWAYS, 5000, 128, False)  # no prefill worker


def test_decode_choice_prefers_the_smaller_batch_then_free_blocks_and_needs_room():
    a, b, c = load("a", running=5), load("b", running=2, free=10), load("c", running=2, free=50)
    assert choose_decode([a, b, c], 100, max_in_flight=8).worker_id == "c"
    assert choose_decode([a, b, c], 100 * 16, max_in_flight=8) is None  # no room anywhere
    assert choose_decode([a, b, c], 400, max_in_flight=8).worker_id == "c"  # b lacks blocks
    assert choose_decode([load("a", in_flight=8)], 10, max_in_flight=8) is None  # slots full


def test_prefill_choice_weighs_queued_tokens_against_cached_prefix():
    a, b = load("a", queued=100), load("b", queued=0)
    assert choose_prefill([a, b], 500, {}, 8).worker_id == "b"
    # a holds 30 of the prompt's blocks (480 tokens): 100 + 20 < 0 + 500
    assert choose_prefill([a, b], 500, {"a": 30}, 8).worker_id == "a"
    assert choose_prefill([load("a", in_flight=8)], 5, {}, 8) is None


def test_round_robin_cycles_over_workers_with_a_free_slot():
    ws = [load("b"), load("a"), load("c", in_flight=8)]
    assert [round_robin(ws, t, 8).worker_id for t in range(4)] == ["a", "b", "a", "b"]


def test_aborts_go_to_both_workers_at_once_and_one_failure_does_not_stop_the_other():
    import asyncio
    import time

    from pdserve.protocol import WorkerRecord, WorkerRole
    from pdserve.router.router import Router, RouterConfig
    from pdserve.router.view import LiveWorker

    class Handle:
        def __init__(self, fail: bool = False):
            self.fail, self.done = fail, False

        async def abort(self, transfer_id):
            calls.append(self)
            if len(calls) == 2:
                both.set()
            if self.fail:
                raise ConnectionError("dead")
            await asyncio.wait_for(both.wait(), 30)  # sequential aborts would never get here
            self.done = True

    def worker(wid, role, handle):
        return LiveWorker(WorkerRecord(wid, role, "n", "", 16, 10, 10, 0, 0, 0, time.time(),
                                       1.0), handle)

    async def run(prefill_fails: bool):
        router = Router(RouterConfig(), None, None, lambda record: None)
        try:
            d, p = Handle(), Handle(fail=prefill_fails)
            await router.dispatcher.abort("t", worker("d", WorkerRole.DECODE, d),
                                worker("p", WorkerRole.PREFILL, p))
            return d, p
        finally:
            await router.stream.close()

    calls, both = [], None

    async def main():
        nonlocal both, calls
        for fails in (False, True):
            calls, both = [], asyncio.Event()
            d, p = await run(fails)
            assert d.done and p.done is not fails and len(calls) == 2

    asyncio.run(main())
