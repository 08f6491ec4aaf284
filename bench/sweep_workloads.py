"""The sweep's workloads (bench.sweep): what is sent at each probed rate.

- `chat`, `summarize`: random prompts and answers of the given lengths (vLLM's random
  dataset), Poisson arrivals at the rate.
- `azure-code`, `azure-conv`, `mooncake`: a trace's requests in order, lengths scaled to this
  machine (bench.overload's REPLAYS scaling), its own gaps rescaled so the mean rate is the
  probed one: the trace's bursts stay. Mooncake's requests that share leading hash ids share
  those prefix blocks, so prefix caches (and delta KV transfers) have something to reuse;
  its window is the trace's last requests, which share prefixes among themselves as the
  whole trace does (64% of the prompt tokens at these lengths; its first 32 share none, their
  prefixes come back hundreds of requests later).
- `shifting`: Poisson arrivals at the rate, the prompts alternating between chat-like and
  summarize-like phases every `phase_s` seconds of arrival time: the load's shape moves
  under a deployment tuned for either.
Every run draws fresh prompt tokens (its seed and rate), so no run finds another's prompts
in a prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pdserve.bench.workload import (
    DEFAULT_TRACES_DIR,
    Sample,
    arrival_times,
    random_dataset,
    trace_dataset,
)


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    range_ratio: float
    rates: tuple[float, ...]
    fixed_rate: float
    ttft_scale: float  # SLO = scale x unloaded value
    tpot_scale: float
    about: str
    trace: str = ""  # a trace's requests instead of random ones (bench.workload.TRACES)
    trace_tail: bool = False  # the trace's last requests instead of its first
    length_scale: float = 1.0  # the trace's lengths times this
    max_input: int = 2048
    max_output: int = 128
    phases: tuple[str, ...] = ()  # workloads whose prompts alternate (shifting)
    phase_s: float = 60.0


WORKLOADS = {
    "chat": Workload("chat", 192, 96, 0.5, (0.5, 1.0, 1.5, 2.0), 1.0, 5.0, 3.0,
                     "chat-like: short prompts (96-288 tokens), long answers (48-144)"),
    "summarize": Workload("summarize", 768, 48, 0.25, (0.15, 0.3, 0.45, 0.6), 0.3, 5.0, 2.0,
                          "summarization-like: long prompts (576-960 tokens) arriving while "
                          "others decode, short answers (36-60), tight TPOT SLO"),
    "azure-code": Workload("azure-code", 0, 0, 0.0, (0.15, 0.3, 0.45, 0.6), 0.3, 5.0, 3.0,
                           "Azure 2023 code: long prompts (x0.5, up to 2,048 tokens), short "
                           "answers (up to 128), the trace's bursts",
                           trace="azure-code", length_scale=0.5),
    "azure-conv": Workload("azure-conv", 0, 0, 0.0, (0.2, 0.4, 0.6, 0.8), 0.4, 5.0, 3.0,
                           "Azure 2023 conversation: prompts x0.5 (median ~510 tokens), "
                           "answers up to 128, the trace's bursts",
                           trace="azure-conv", length_scale=0.5),
    "mooncake": Workload("mooncake", 0, 0, 0.0, (0.2, 0.4, 0.6, 0.8), 0.4, 5.0, 3.0,
                         "Mooncake, the trace's last requests: shared prefix blocks (26 "
                         "tokens each at x0.05; 54-66% of the prompt tokens in windows of "
                         "32-128), prompts up to 2,048 tokens, answers up to 64, its bursts",
                         trace="mooncake", trace_tail=True, length_scale=0.05,
                         max_output=64),
    "shifting": Workload("shifting", 0, 0, 0.0, (0.25, 0.5, 0.75, 1.0), 0.5, 5.0, 2.0,
                         "chat-like and summarize-like phases alternating every 30 s (a "
                         "run of 48 requests at 0.5 req/s sees three)",
                         phases=("chat", "summarize"), phase_s=30.0),
}


def samples_for(w: Workload, n: int, seed: int, rate_index: int = 0,
                rate: float | None = None) -> list[Sample]:
    """`n` requests of the workload for one run; `rate` sets the arrivals of traces (their
    gaps rescaled to it) and of `shifting` (its phases follow arrival time); others get
    their arrivals from the load generator. Calibration passes no rate."""
    draw = 1000 * (rate_index + 1) + seed
    if w.trace:
        out = trace_dataset(w.trace, DEFAULT_TRACES_DIR, n, w.length_scale, 1.0,
                            w.max_input, w.max_output, seed=draw, tail=w.trace_tail)
        if rate is None or len(out) < 2 or out[-1].arrival <= 0:
            return [replace(s, arrival=None) for s in out]
        factor = (len(out) - 1) / out[-1].arrival / rate  # natural rate / probed rate
        return [replace(s, arrival=s.arrival * factor) for s in out]
    if w.phases:
        parts = [samples_for(WORKLOADS[p], n, seed, rate_index) for p in w.phases]
        if rate is None:
            return [parts[i % len(parts)][i] for i in range(n)]
        times = arrival_times(n, rate, seed=draw)
        return [replace(parts[int(t // w.phase_s) % len(parts)][i], arrival=t)
                for i, t in enumerate(times)]
    return random_dataset(n, w.input_len, w.output_len, w.range_ratio, seed=draw)
