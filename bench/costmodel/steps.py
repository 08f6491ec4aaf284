"""Engine step times on this machine: the observations `fit.fit_step` fits.

Every time is one `Engine.step()` call of the real engine (schedule, model, sample, update),
timed with perf_counter; what the step computed (tokens, attention pairs, context) is read
from the batch the scheduler made (through the step's hook), not assumed from the request.

`measure_steps(model_path, grid, bar)` builds a mixed-mode engine (prefix caching on) for the
prefill and mixed steps, drops it, then a decode-only engine for the decode steps, each
warmed up first (`Engine.warm_up`), and returns the observations:
- prefill: one prompt's chunk of n tokens at offset 0 (a fresh random prompt every run, so
  the prefix cache never hits), and at offsets o: the first o tokens are computed once and
  stay in the prefix cache, then each run's prompt is those o tokens + n fresh ones, so the
  step computes n tokens after o cached ones, as chunked prefill's later chunks do.
- decode: b sequences of c context tokens, admitted as a decode worker admits prefilled
  prompts (`reserve` + `admit_prefilled`) over random KV already in the cache (the values
  do not change the cost; no prefill is spent on them), then steps of the whole batch.
- mixed: b sequences decoding (prefilled by the engine) and one new prompt of n tokens in
  the same step, as a colocated worker runs them.
A point's runs: the first is discarded when shorter than DISCARD_BELOW_S (first-use costs;
a longer step's are lost in it), then runs are kept up to `repeats` while they fit in
`point_budget_s`, at least one; the point is the run at the (low) median time.
"""

from __future__ import annotations

import gc
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.bench.costmodel.fit import StepObservation
from pdserve.engine import (
    CacheConfig,
    Engine,
    EngineConfig,
    EngineMode,
    ModelConfig,
    SamplingParams,
    ScheduledBatch,
    SchedulerConfig,
)
from pdserve.protocol.cost_profile import chunk_pairs

BLOCK_SIZE = 16
DISCARD_BELOW_S = 1.0
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class Grid:
    prefill_chunks: tuple[int, ...]
    prefill_offsets: tuple[int, ...]  # multiples of BLOCK_SIZE (whole cached blocks)
    offset_chunks: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_max_tokens: int  # bound on batch * context (the decode engine's KV memory)
    mixed_batches: tuple[int, ...]
    mixed_context: int
    mixed_chunks: tuple[int, ...]
    repeats: int = 3
    point_budget_s: float = 6.0

    @property
    def decode_points(self) -> list[tuple[int, int]]:
        return [(b, c) for c in self.decode_contexts for b in self.decode_batches
                if b * c <= self.decode_max_tokens]

    @property
    def num_points(self) -> int:
        return (len(self.prefill_chunks) + len(self.prefill_offsets) * len(self.offset_chunks)
                + len(self.decode_points) + len(self.mixed_batches) * len(self.mixed_chunks))

    @property
    def token_budget(self) -> int:
        """The mixed engine's tokens per step: every point's step in one piece."""
        return max(*self.prefill_chunks, *self.prefill_offsets, *self.offset_chunks,
                   max(self.mixed_chunks) + max(self.mixed_batches),
                   max(self.mixed_batches) * self.mixed_context)


# about a minute and a half of steps with SmolLM2 on one core of a 2-core EPYC VM
FULL = Grid(prefill_chunks=(16, 32, 64, 128, 256, 512, 1024, 2048), prefill_offsets=(512, 1536),
            offset_chunks=(16, 128, 512), decode_batches=(1, 2, 4, 8, 16, 32, 64),
            decode_contexts=(64, 256, 1024, 2048), decode_max_tokens=32768,
            mixed_batches=(4, 16), mixed_context=64, mixed_chunks=(32, 256, 1024))
# a handful of points in seconds (tests, a first look)
QUICK = Grid(prefill_chunks=(8, 32, 128), prefill_offsets=(128,), offset_chunks=(8, 32),
             decode_batches=(1, 4, 16), decode_contexts=(32, 128), decode_max_tokens=2048,
             mixed_batches=(4,), mixed_context=32, mixed_chunks=(16, 64), repeats=2,
             point_budget_s=2.0)

Run = Callable[[], tuple[float, tuple[int, int, int]]]


def step_features(batch: ScheduledBatch) -> tuple[int, int, int, int]:
    """(tokens, pairs, context, decoding sequences) of a scheduled step. An item computing an
    output token decodes and reads `end` keys; any other computes a prompt chunk
    (chunk_pairs)."""
    tokens = pairs = context = seqs = 0
    for item in batch.requests:
        tokens += item.num_new_tokens
        if item.start >= item.request.num_prompt_tokens:
            context += item.end
            seqs += 1
        else:
            pairs += chunk_pairs(item.start, item.num_new_tokens)
    return tokens, pairs, context, seqs


def timed_step(engine: Engine) -> tuple[float, tuple[int, int, int, int]]:
    """Seconds of one `engine.step()` and what it computed."""
    seen: list[tuple[int, int, int, int]] = []

    def note(batch: ScheduledBatch):
        seen.append(step_features(batch))
        return None  # no KV hook: only the batch is read

    t0 = time.perf_counter()
    engine.step(note)
    seconds = time.perf_counter() - t0
    if len(seen) != 1:
        raise RuntimeError("the engine scheduled nothing for a measured step")
    return seconds, seen[0]


def point(run: Run, kind: str, repeats: int, budget_s: float) -> StepObservation:
    """One observation from repeated runs (see the module)."""
    first = run()
    runs = [] if first[0] < DISCARD_BELOW_S else [first]
    wanted = max(1, min(repeats, int(budget_s / max(first[0], 1e-6))))
    while len(runs) < wanted:
        runs.append(run())
    seconds, (tokens, pairs, context, seqs) = sorted(runs)[(len(runs) - 1) // 2]
    return StepObservation(tokens, pairs, context, seconds, kind, seqs)


class _Prompts:
    """Fresh random prompts (never a prefix-cache hit) and request ids."""

    def __init__(self, vocab: int, seed: int = 0):
        self.rng, self.vocab, self.ids = random.Random(seed), vocab, itertools.count()

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def rid(self) -> str:
        return f"p{next(self.ids)}"


def build_engine(model_path: Path, mode: EngineMode, num_blocks: int, budget: int,
                 max_seqs: int) -> Engine:
    config = EngineConfig(
        model=ModelConfig.from_pretrained(model_path),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
        scheduler=SchedulerConfig(mode=mode, max_num_batched_tokens=budget,
                                  max_num_seqs=max_seqs),
        device="cpu", dtype=torch.float32)
    engine = Engine(config)
    engine.warm_up()
    return engine


def _prefill_points(engine: Engine, grid: Grid, prompts: _Prompts, bar) -> list:
    out = []

    def chunk_run(prefix: list[int], n: int) -> Run:
        def run():
            engine.add_request(prompts.rid(), prefix + prompts.tokens(n), ONE_TOKEN)
            return timed_step(engine)  # max_tokens 1: the request ends in this step
        return run

    for n in grid.prefill_chunks:
        out.append(point(chunk_run([], n), "prefill", grid.repeats, grid.point_budget_s))
        bar.update()
    for offset in grid.prefill_offsets:
        prefix = prompts.tokens(offset)
        engine.add_request(prompts.rid(), prefix, ONE_TOKEN)  # computed once, then cached
        while engine.has_work():
            engine.step()
        for n in grid.offset_chunks:
            out.append(point(chunk_run(prefix, n), "prefill", grid.repeats,
                             grid.point_budget_s))
            bar.update()
    return out


def _mixed_points(engine: Engine, grid: Grid, prompts: _Prompts, bar) -> list:
    out = []
    max_len = engine.config.model.max_model_len
    params = SamplingParams(max_tokens=max_len - grid.mixed_context - 1, temperature=0.0,
                            ignore_eos=True)
    for b in grid.mixed_batches:
        ids = [prompts.rid() for _ in range(b)]
        for rid in ids:
            engine.add_request(rid, prompts.tokens(grid.mixed_context), params)
        while any(not r.output_token_ids for r in engine.scheduler.requests.values()):
            engine.step()  # prefill the decoding sequences (not measured)
        for n in grid.mixed_chunks:
            def run(n=n):
                engine.add_request(prompts.rid(), prompts.tokens(n), ONE_TOKEN)
                return timed_step(engine)
            out.append(point(run, "mixed", grid.repeats, grid.point_budget_s))
            bar.update()
        for rid in ids:
            engine.abort(rid)
    return out


def _decode_points(engine: Engine, grid: Grid, prompts: _Prompts, bar) -> list:
    out = []
    # random KV everywhere once: every reserved block then holds plausible values
    engine.kv_cache.k.normal_()
    engine.kv_cache.v.normal_()
    params = SamplingParams(max_tokens=grid.repeats + 8, temperature=0.0, ignore_eos=True)
    for b, c in grid.decode_points:
        ids = [prompts.rid() for _ in range(b)]
        for rid in ids:
            engine.reserve(rid, prompts.tokens(c), params)
            engine.admit_prefilled(rid, prompts.tokens(1)[0])
        out.append(point(lambda: timed_step(engine), "decode", grid.repeats,
                         grid.point_budget_s))
        for rid in ids:
            engine.abort(rid)
        bar.update()
    return out


def measure_steps(model_path: Path, grid: Grid, bar) -> list[StepObservation]:
    """Every point of `grid` (see the module); `bar` (tqdm) advances once per point."""
    vocab = ModelConfig.from_pretrained(model_path).vocab_size
    prompts = _Prompts(vocab)
    # two steps' worth of prompts (an offset prefix stays cached beside a chunk), and the
    # mixed decoders, which grow by a token a step: 64 covers every mixed step
    mixed_blocks = -(-(2 * grid.token_budget + max(grid.mixed_batches) * 64) // BLOCK_SIZE)
    engine = build_engine(model_path, EngineMode.MIXED, mixed_blocks + 64, grid.token_budget,
                          max(grid.mixed_batches) + 1)
    observations = _prefill_points(engine, grid, prompts, bar)
    observations += _mixed_points(engine, grid, prompts, bar)
    del engine
    gc.collect()  # one model and one KV cache in memory at a time
    max_batch = max(b for b, _ in grid.decode_points)
    # each sequence grows by a few tokens: at most two more blocks each
    blocks = grid.decode_max_tokens // BLOCK_SIZE + 2 * max_batch + 64
    engine = build_engine(model_path, EngineMode.DECODE_ONLY, blocks, max(64, max_batch),
                          max_batch)
    observations += _decode_points(engine, grid, prompts, bar)
    return observations
