"""How much slower a worker's steps run while another worker computes on the same host: the
cores share the memory bus and the last-level cache, and a decode step, which streams the
weights, feels a neighbour's prefill. Measured as deployments here run: this process on one
core, a co-runner process pinned to another core prefilling 512-token prompts without a
pause (as a loaded prefill or colocated worker does); decode steps (2 sequences over 512
tokens) and prefill steps (256-token chunks) timed alone, then beside the co-runner, then
alone again, each the median of its runs. The slowdowns are with / alone - 1 (the alone
runs before and after pooled); a host of one worker per GPU has none, and a machine with one
usable core cannot measure it (0, noted).

Lifecycle: the co-runner starts (loads the model, warms up) after the alone runs, signals
ready, prefills until told to stop, and is joined before `measure_contention` returns.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
from pathlib import Path

import torch

from pdserve.bench.costmodel.steps import ONE_TOKEN, _Prompts, build_engine, timed_step
from pdserve.engine import EngineMode, ModelConfig, SamplingParams

DECODE_RUNS = 24
PREFILL_RUNS = 6


def _co_runner(model_path: str, core: int, ready, stop) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    engine = build_engine(Path(model_path), EngineMode.MIXED, 128, 512, 2)
    prompts = _Prompts(ModelConfig.from_pretrained(Path(model_path)).vocab_size, seed=7)
    ready.set()
    while not stop.is_set():
        engine.add_request(prompts.rid(), prompts.tokens(512), ONE_TOKEN)
        while engine.has_work():
            engine.step()


def _timings(model_path: Path, prompts: _Prompts) -> tuple[list[float], list[float]]:
    """(decode step seconds, prefill step seconds) on fresh engines in this process."""
    engine = build_engine(model_path, EngineMode.DECODE_ONLY, 256, 64, 4)
    engine.kv_cache.k.normal_()
    engine.kv_cache.v.normal_()
    params = SamplingParams(max_tokens=DECODE_RUNS + 8, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        rid = prompts.rid()
        engine.reserve(rid, prompts.tokens(512), params)
        engine.admit_prefilled(rid, prompts.tokens(1)[0])
    decode = [timed_step(engine)[0] for _ in range(DECODE_RUNS)]
    del engine
    engine = build_engine(model_path, EngineMode.MIXED, 64, 256, 2)
    prefill = []
    for _ in range(PREFILL_RUNS):
        engine.add_request(prompts.rid(), prompts.tokens(256), ONE_TOKEN)
        prefill.append(timed_step(engine)[0])
    return decode, prefill


def measure_contention(model_path: Path, other_core: int | None, bar) -> dict:
    """{"decode": slowdown, "prefill": slowdown, ...} (see the module); `other_core`: where
    the co-runner runs, None when there is no other core."""
    if other_core is None:
        bar.update(3)
        return {"decode": 0.0, "prefill": 0.0, "note": "one usable core: not measured"}
    prompts = _Prompts(ModelConfig.from_pretrained(model_path).vocab_size, seed=3)
    before = _timings(model_path, prompts)
    bar.update()
    spawn = multiprocessing.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    runner = spawn.Process(target=_co_runner, args=(str(model_path), other_core, ready, stop),
                           daemon=True)
    runner.start()
    try:
        if not ready.wait(300):
            raise RuntimeError("the co-runner did not start")
        beside = _timings(model_path, prompts)
    finally:
        stop.set()
        runner.join(60)
        if runner.is_alive():
            runner.kill()
    bar.update()
    after = _timings(model_path, prompts)
    bar.update()
    out = {}
    for i, kind in enumerate(("decode", "prefill")):
        alone = statistics.median(before[i] + after[i])
        out[kind] = max(0.0, statistics.median(beside[i]) / alone - 1.0)
        out[f"{kind}_alone_s"], out[f"{kind}_beside_s"] = alone, statistics.median(beside[i])
    out["method"] = ("decode: 2 sequences x 512 context; prefill: 256-token chunks; beside a "
                     "co-runner prefilling 512-token prompts on another core")
    return out
