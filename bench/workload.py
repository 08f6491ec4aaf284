"""Requests to send and when: datasets (random, trace replay) and open-loop arrivals.

Datasets give token-id prompts (the public API takes ids, so no tokenizer is needed and
lengths are exact) with forced output lengths (sent with ignore_eos).
- `random`: input length uniform in [L(1 - r), L(1 + r)], same for outputs (vLLM's
  `--random-range-ratio`), optionally after a shared prefix of `prefix_len` tokens.
- traces (shipped in this package's `traces/`, `DEFAULT_TRACES_DIR`): Azure 2023
  conversation / code (CSV) and Mooncake (JSONL) lengths and arrival times, scaled by
  `length_scale` (lengths) and `time_scale` (gaps are multiplied by it: 2.0 replays at half
  the rate). For Mooncake, requests that share leading `hash_ids` share that many prefix
  blocks (512 tokens x length_scale each). `tail` takes the trace's last requests instead of
  its first: a window's prefix sharing is with the requests before it in the window, and a
  trace's head finds every prefix cold.
Warm-up: `warmup_samples` draws untimed requests apart from the measured ones, so no measured
request finds its own prompt in a prefix cache because the warm-up put it there.
Arrivals: gamma-distributed gaps with shape `burstiness` (1 = Poisson), rescaled so the last
request is sent at N / rate, as vLLM's benchmark does; rate inf sends everything at once.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

TRACES = {"azure-conv": "azure2023_conv.csv", "azure-code": "azure2023_code.csv",
          "mooncake": "mooncake_synthetic.jsonl"}
MOONCAKE_BLOCK = 512
# the traces ship with the package, so the default needs no path outside it
DEFAULT_TRACES_DIR = Path(__file__).resolve().parent / "traces"


@dataclass(frozen=True)
class Sample:
    prompt: tuple[int, ...]
    output_len: int
    arrival: float | None = None  # seconds from the start, for trace replay


def _tokens(rng: random.Random, n: int, vocab: int) -> tuple[int, ...]:
    # skip the low ids, where tokenizers keep their special tokens
    return tuple(rng.randrange(1000, vocab) for _ in range(n))


def random_dataset(n: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   prefix_len: int = 0, vocab: int = 49152, seed: int = 0) -> list[Sample]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    prefix = _tokens(rng, prefix_len, vocab)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    return [Sample(prefix + _tokens(rng, length(input_len), vocab), length(output_len))
            for _ in range(n)]


def trace_dataset(name: str, traces_dir: Path, n: int, length_scale: float = 1.0,
                  time_scale: float = 1.0, max_input: int | None = None, max_output: int = 512,
                  vocab: int = 49152, seed: int = 0, tail: bool = False) -> list[Sample]:
    """The first (`tail`: last) `n` requests of a trace, arrival times relative to the
    window's first."""
    path = traces_dir / TRACES[name]
    read = _mooncake_rows if name == "mooncake" else _azure_rows
    rows = read(path, None)[-n:] if tail else read(path, n)
    if not rows:
        raise ValueError(f"{path} has no requests")
    rng = random.Random(seed)
    blocks: dict[int, tuple[int, ...]] = {}
    block_len = max(1, round(MOONCAKE_BLOCK * length_scale))
    t0 = rows[0][0]
    out = []
    for t, in_len, out_len, hash_ids in rows:
        in_len = max(1, round(in_len * length_scale))
        if max_input:
            in_len = min(in_len, max_input)
        prompt: tuple[int, ...] = ()
        for h in hash_ids:  # shared prefix blocks first
            if len(prompt) + block_len > in_len:
                break
            if h not in blocks:
                blocks[h] = _tokens(rng, block_len, vocab)
            prompt += blocks[h]
        prompt += _tokens(rng, in_len - len(prompt), vocab)
        out_len = min(max(1, round(out_len * length_scale)), max_output)
        out.append(Sample(prompt, out_len, (t - t0) * time_scale))
    return out


def warmup_samples(measured: Sequence[Sample], n: int, shared_prefix: int = 0,
                   vocab: int = 49152, seed: int = 0, max_output: int = 4) -> list[Sample]:
    """`n` untimed requests to send before `measured`, never among them.

    Warm-up i is shaped like measured[i % len(measured)] (prompt length; output capped at
    `max_output`, no arrival time). Its first `shared_prefix` tokens are the prefix every
    measured prompt shares by construction (`random_dataset`'s `prefix_len`; 0 for traces),
    the rest are drawn from a generator of their own, and its first own token differs from
    every measured prompt's token at that position. So a warm-up prompt neither equals,
    prefixes nor is prefixed by a measured one, and shares no prefix block with any beyond
    the prefix the whole measured set shares. ValueError if the measured prompts do not
    share `shared_prefix` tokens or are not longer than it.
    """
    if n <= 0:
        return []
    if not measured:
        raise ValueError("warm-up samples are drawn against a non-empty measured set")
    prefix = measured[0].prompt[:shared_prefix]
    if any(len(m.prompt) <= shared_prefix or m.prompt[:shared_prefix] != prefix
           for m in measured):
        raise ValueError(f"the measured prompts do not all share {shared_prefix} leading "
                         "tokens and go on past them")
    taken = {m.prompt[shared_prefix] for m in measured}
    if len(taken) >= vocab - 1000:
        raise ValueError("the measured prompts use every token at the first position after "
                         "their shared prefix; no warm-up prompt can differ from all of them")
    rng = random.Random(f"warmup-{seed}")  # a stream of its own, not the measured set's
    out = []
    for i in range(n):
        shape = measured[i % len(measured)]
        first = rng.randrange(1000, vocab)
        while first in taken:
            first = rng.randrange(1000, vocab)
        own = len(shape.prompt) - shared_prefix
        prompt = prefix + (first,) + _tokens(rng, own - 1, vocab)
        out.append(Sample(prompt, max(1, min(shape.output_len, max_output))))
    return out


def shared_prefix_tokens(samples: Sequence[Sample], block_size: int = 16) -> list[int]:
    """Per sample, the prompt tokens a perfect prefix cache of `block_size`-token blocks
    would hold when it arrives after the samples before it: its leading full blocks whose
    whole prefix an earlier prompt began with (as the engine's chained block hashes match)."""
    seen: set[tuple] = set()
    out = []
    for s in samples:
        key: tuple = ()
        shared = 0
        hit = True
        for b in range(len(s.prompt) // block_size):
            key = (hash(key), s.prompt[b * block_size:(b + 1) * block_size])
            if hit and key in seen:
                shared += block_size
            else:
                hit = False
                seen.add(key)
        out.append(shared)
    return out


def _azure_rows(path: Path, n: int | None):
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            t = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"]), []))
            if len(rows) == n:
                break
    return rows


def _mooncake_rows(path: Path, n: int | None):
    rows = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            rows.append((r["timestamp"] / 1e3, r["input_length"], r["output_length"],
                         r.get("hash_ids", [])))
            if len(rows) == n:
                break
    return rows


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of `n` requests at `rate` req/s."""
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes at once
    times = np.cumsum(gaps)
    if times[-1] > 0:  # the last request at N / rate, as vLLM's benchmark rescales
        times *= (n / rate) / times[-1]
    return times.tolist()
