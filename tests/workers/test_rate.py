"""The prefill rate admission divides by (worker.rate): prompt tokens over the busy time of
every step taken while prompts waited, decode-only steps included."""

from __future__ import annotations

import pytest

from pdserve.worker.rate import WINDOW_S, PrefillRate


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
