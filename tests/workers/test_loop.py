"""The engine loop: control calls between steps, errors to their callers, a broken engine
reported instead of hidden, and nothing accepted after close."""

from __future__ import annotations

import threading

import pytest
from helpers import assert_no_leaks, greedy, make_engine, wait_for

from pdserve.worker.loop import EngineLoop, LoopHandler


class Recorder(LoopHandler):
    def __init__(self, fail_tick: bool = False):
        self.outputs = []
        self.fail_tick = fail_tick
        self.closed = threading.Event()
        self.thread = None

    def after_step(self, outputs):
        self.thread = threading.current_thread()
        self.outputs += outputs

    def tick(self):
        if self.fail_tick:
            raise RuntimeError("transport exploded")

    def close(self):
        self.closed.set()


@pytest.fixture()
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir)


def test_calls_run_on_the_loop_thread_and_requests_complete(engine):
    handler = Recorder()
    loop = EngineLoop(engine, handler)
    try:
        for i in range(3):
            loop.call(lambda i=i: engine.add_request(f"r{i}", [1, 2, 3 + i], greedy(5))).result(5)
        done = threading.Event()
        loop.post(done.set)
        assert done.wait(5)
        thread = loop.call(threading.current_thread).result(5)
        assert thread is not threading.current_thread()
        # wait for all three to finish, then the engine is clean
        loop.call(lambda: None).result(5)
        for _ in range(200):
            if sum(o.finished for o in handler.outputs) == 3:
                break
            loop.call(lambda: None).result(5)
        assert sum(o.finished for o in handler.outputs) == 3
        assert handler.thread is thread
    finally:
        loop.close()
    assert handler.closed.is_set()
    assert_no_leaks(engine)


def test_an_exception_in_a_call_goes_to_its_caller_and_the_loop_carries_on(engine):
    loop = EngineLoop(engine, Recorder())
    try:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            loop.call(lambda: engine.add_request("bad", [10**6], greedy(2))).result(5)
        assert loop.call(lambda: 42).result(5) == 42
        assert loop.load().error == ""
    finally:
        loop.close()


def test_a_failing_handler_breaks_the_loop_visibly(engine):
    handler = Recorder(fail_tick=True)
    loop = EngineLoop(engine, handler)
    assert handler.closed.wait(5)
    loop.close()
    assert "transport exploded" in loop.load().error
    with pytest.raises(RuntimeError, match="transport exploded"):
        loop.call(lambda: 1).result(5)


def test_nothing_runs_after_close(engine):
    loop = EngineLoop(engine, Recorder())
    loop.close()
    assert not loop.is_alive
    with pytest.raises(RuntimeError, match="closed"):
        loop.call(lambda: 1).result(5)
    loop.close()  # idempotent


class HeldStep(Recorder):
    """A step that does not end until the test releases it."""

    def __init__(self):
        super().__init__()
        self.in_step = threading.Event()
        self.release = threading.Event()

    def after_step(self, outputs):
        self.in_step.set()
        self.release.wait(30)
        super().after_step(outputs)


def test_prefix_events_are_handed_out_without_waiting_for_a_step(engine):
    handler = HeldStep()
    loop = EngineLoop(engine, handler)
    try:
        assert loop.drain_prefix_events() == ([], [])  # starts the recording
        loop.call(lambda: engine.add_request("r", list(range(1, 18)), greedy(3))).result(5)
        assert handler.in_step.wait(5)
        drained = threading.Thread(target=loop.drain_prefix_events, daemon=True)
        drained.start()
        drained.join(10)
        assert not drained.is_alive()  # answered while the step is still held
        handler.release.set()
        entered: list[int] = []
        wait_for(lambda: entered.extend(loop.drain_prefix_events()[0]) or len(entered) >= 4,
                 10, "the 4 full blocks of 17 tokens to enter the prefix cache")
    finally:
        handler.release.set()
        loop.close()


def test_the_load_report_carries_the_prefill_rate_measured_on_prefill_steps(engine):
    """Decode steps and short prompts say nothing of the prefill rate; a long prompt does."""
    handler = Recorder()
    loop = EngineLoop(engine, handler)
    try:
        loop.call(lambda: engine.add_request("short", [1, 2, 3], greedy(20))).result(5)
        wait_for(lambda: any(o.finished for o in handler.outputs), 30, "the short request")
        assert loop.load().prefill_tokens_per_s == 0.0  # 3 prompt tokens, then decode steps
        loop.call(lambda: engine.add_request("long", list(range(1, 200)), greedy(1))).result(5)
        wait_for(lambda: loop.load().prefill_tokens_per_s > 0, 30, "a measured prefill rate")
    finally:
        loop.close()
    assert_no_leaks(engine)


def test_the_load_report_carries_what_a_prompt_chunk_adds_to_the_decoding_steps(engine):
    """A prompt prefilled beside a decoding request makes that step longer than a
    decode-only one: the report's prefill stall says by how much, on average; the
    decode-only step time leaves it out."""
    handler = Recorder()
    loop = EngineLoop(engine, handler)
    try:
        loop.call(lambda: engine.add_request("decoding", [1, 2, 3], greedy(60))).result(5)
        wait_for(lambda: loop.load().decode_step_s > 0, 30, "a measured decode step")
        assert loop.load().prefill_stall_s == 0.0  # decode-only so far
        prompt = [1 + i % 250 for i in range(400)]  # the tiny model's vocabulary is 256
        loop.call(lambda: engine.add_request("long", prompt, greedy(1))).result(5)
        wait_for(lambda: loop.load().prefill_stall_s > 0, 30, "a measured prefill stall")
        wait_for(lambda: any(o.finished and o.request_id == "decoding"
                             for o in handler.outputs), 60, "the decoding request")
    finally:
        loop.close()
    assert_no_leaks(engine)
