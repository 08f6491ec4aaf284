"""A benchmark backend for tests: answers every request at once and remembers what was sent."""

from __future__ import annotations

from pdserve.bench.backends import Backend
from pdserve.bench.metrics import RequestResult
from pdserve.bench.workload import Sample


class Recorder(Backend):
    """Answers every request at once (fixed, plausible timings) and keeps the samples, in order."""

    name = "recorder"

    def __init__(self):
        self.sent: list[Sample] = []

    async def send(self, sample: Sample) -> RequestResult:
        self.sent.append(sample)
        n = sample.output_len
        return RequestResult(len(sample.prompt), True, "", 0.01, [0.001] * (n - 1),
                             0.01 + 0.001 * (n - 1), n)

    async def close(self) -> None:
        pass
