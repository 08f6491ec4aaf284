"""The soak's accounting, with fake backends and no server: a stream that never ends is
counted hung (and cancelled), refusals back off instead of spinning, failures are counted by
status, and RSS growth is judged from the middle of the load to its end."""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import pytest

from pdserve.bench import soak
from pdserve.bench.metrics import RequestResult


def args(**kw) -> argparse.Namespace:
    base = dict(input_len=8, output_len=4, range_ratio=0.5, hang_after=0.05, retry_after=0.2)
    return argparse.Namespace(**{**base, **kw})


class Scripted:
    """Answers from a script of outcomes: "ok", "refused", "failed" or "hang"."""

    name = "scripted"

    def __init__(self, script: list[str]):
        self.script = script
        self.sent_at: list[float] = []

    async def send(self, sample):
        self.sent_at.append(time.monotonic())
        what = self.script[min(len(self.sent_at) - 1, len(self.script) - 1)]
        if what == "hang":
            await asyncio.sleep(3600)
        if what == "ok":
            return RequestResult(len(sample.prompt), True, "", 0.001, [], 0.002, 1)
        code = "RESOURCE_EXHAUSTED" if what == "refused" else "UNAVAILABLE"
        return RequestResult(len(sample.prompt), False, code, refused=what == "refused",
                             code=code)


def run_stream(backend, seconds: float, **kw) -> soak.Tally:
    tally = soak.Tally()

    async def go():
        await soak.stream(backend, tally, time.monotonic() + seconds, random.Random(0),
                          args(**kw))

    asyncio.run(go())
    return tally


def test_a_stream_that_never_ends_is_hung_and_the_stream_goes_on():
    tally = run_stream(Scripted(["hang", "ok"]), 0.2)
    counts = tally.counts()
    assert counts["hung"] == 1 and counts["ok"] >= 1 and counts["in_flight"] == 0


def test_refusals_and_failures_back_off_and_are_counted_apart():
    backend = Scripted(["refused", "failed", "ok"])
    tally = run_stream(backend, 0.3, retry_after=0.1)
    counts = tally.counts()
    assert counts["refused"] == 1 and counts["failed"] == 1 and counts["hung"] == 0
    gaps = [b - a for a, b in zip(backend.sent_at, backend.sent_at[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.05  # waited (0.1 s ± 50%) after each
    assert len(backend.sent_at) > 10  # ok requests follow one another at once


def test_rss_growth_from_the_middle_to_the_end():
    samples = [{"t": 0, "rss_mb": {"router": 200.0, "decode-0": 1000.0}},
               {"t": 50, "rss_mb": {"router": 260.0, "decode-0": 2000.0}},
               {"t": 100, "rss_mb": {"router": 270.0, "decode-0": 2600.0, "new": 5.0}}]
    g = soak.growth(samples, 50, 100, tolerance=0.10)
    assert g["router"] == {"from_mb": 260.0, "to_mb": 270.0, "bounded": True}
    assert not g["decode-0"]["bounded"]  # +30% in the second half
    assert "new" not in g  # only processes seen at both ends


def test_plot_soak(tmp_path):
    pytest.importorskip("matplotlib")
    from pdserve.bench.robustness_plots import plot_soak

    samples = [{"t": t, "rss_mb": {"router": 200.0 + t, "redis": 5.0}, "ok": 3 * t,
                "refused": t, "failed": 0, "hung": 0} for t in range(0, 60, 10)]
    plot_soak({"samples": samples, "streams": 10, "deployment": "1p1d", "duration": 50},
              tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
