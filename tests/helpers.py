"""Helpers the tests import: engine construction and the leak check every test ends with."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pdserve.engine import (
    CacheConfig,
    Engine,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SchedulerConfig,
)
from pdserve.engine.scheduler import ScheduledBatch


def make_engine(model_dir: Path, *, block_size: int = 4, num_blocks: int = 256,
                max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                enable_prefix_caching: bool = True, **scheduler_kw) -> Engine:
    """A CPU engine on `model_dir`; `scheduler_kw` go to SchedulerConfig (e.g. mode)."""
    return Engine(EngineConfig(
        model=ModelConfig.from_pretrained(model_dir),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs, **scheduler_kw),
        device="cpu",
    ))


def assert_no_leaks(engine: Engine) -> None:
    """Nothing left behind: every block free, no request in any queue."""
    s, bm = engine.scheduler, engine.block_manager
    assert not s.requests, f"requests left: {list(s.requests)}"
    assert not s.waiting and not s.running and not s.reserved
    assert bm.num_free_blocks == bm.num_blocks, (
        f"{bm.num_blocks - bm.num_free_blocks} blocks still referenced")
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))



def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.01):
    """Until `predicate()` is truthy (its value), or AssertionError naming `what`."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll_s)


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; the tokens each request produced."""
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("engine did not finish")


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of one prompt (batch 1, no padding)."""
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def prefill_logits(engine: Engine, prompts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Logits at the last prompt position of each prompt, all prefilled in one step."""
    for rid, tokens in prompts.items():
        engine.add_request(rid, tokens, greedy(1))
    batch: ScheduledBatch = engine.scheduler.schedule()
    assert all(s.samples for s in batch.requests) and len(batch.requests) == len(prompts)
    logits = engine.runner.execute(batch)
    for rid in prompts:
        engine.abort(rid)
    return {s.request.request_id: logits[i] for i, s in enumerate(batch.requests)}
