"""The rates admission reads (worker.rate): the prefill rate, prompt tokens over the busy
time of every step taken while prompts waited, decode-only steps included; and the time of
a decode-only step."""

from __future__ import annotations

import pytest

from pdserve.worker.rate import WINDOW_S, DecodeStepTime, PrefillRate


def test_decode_steps_taken_while_prompts_wait_count_against_the_rate():
    rate = PrefillRate()
    rate.observe(100, 0.1, backlog=True)  # a prefill step
    rate.observe(0, 0.1, backlog=True)  # a decode step while prompts still wait
    assert rate.tokens_per_s == pytest.approx(100 / 0.2)  # the window filled: sampled


def test_idle_time_and_tiny_samples_say_nothing():
    rate = PrefillRate()
    rate.observe(0, 5.0, backlog=False)  # decode with nothing waiting
    rate.observe(3, 0.01, backlog=False)  # three prompt tokens: overhead, not a rate
    rate.flush()
    assert rate.tokens_per_s == 0.0
    rate.observe(50, WINDOW_S / 4, backlog=False)
    rate.flush()  # the engine idled: the partial window is a sample
    assert rate.tokens_per_s == pytest.approx(50 / (WINDOW_S / 4))


def test_the_average_moves_toward_new_samples():
    rate = PrefillRate(weight=0.5)
    rate.observe(1000, 1.0, backlog=True)
    rate.observe(500, 1.0, backlog=True)
    assert rate.tokens_per_s == pytest.approx(750.0)


def test_the_decode_step_time_counts_only_steps_without_prompt_tokens():
    step = DecodeStepTime(weight=0.5)
    step.observe(num_prefill_tokens=100, num_decodes=3, seconds=1.0)  # a prompt in the way
    step.observe(num_prefill_tokens=0, num_decodes=0, seconds=1.0)  # nothing decoded
    assert step.seconds == 0.0
    step.observe(0, 4, 0.04)
    step.observe(0, 4, 0.08)
    assert step.seconds == pytest.approx(0.06)


def test_the_stall_is_what_prompt_chunks_add_to_the_steps_that_decode_on_average():
    step = DecodeStepTime(weight=1.0, stall_weight=0.5)
    step.observe(100, 3, 1.0)  # no decode-only step to compare with yet: nothing known
    assert step.stall_s == 0.0
    step.observe(0, 3, 0.1)
    step.observe(100, 3, 0.5)  # a chunk's step: 0.4 s more than a decode-only one
    assert step.stall_s == pytest.approx(0.2)
    step.observe(0, 3, 0.1)  # decode-only steps dilute it: they add nothing
    assert step.stall_s == pytest.approx(0.1)
    step.observe(100, 0, 2.0)  # a prompt alone stalls no one
    assert step.stall_s == pytest.approx(0.1)
    assert step.seconds == pytest.approx(0.1)


def test_only_sequences_past_their_prompt_count_as_decoding():
    from types import SimpleNamespace

    from pdserve.worker.rate import decoding

    def item(prompt, start):
        return SimpleNamespace(request=SimpleNamespace(num_prompt_tokens=prompt), start=start)

    batch = SimpleNamespace(requests=[item(10, 10), item(10, 25), item(10, 4), item(50, 0)])
    assert decoding(batch) == 2
