"""The engine: requests in, tokens out, one `step()` at a time. No I/O, no threads.

Life of a request (DESIGN §2, §4):
1. `add_request` validates it and queues it (mixed and decode-only modes run prompts
   locally; prefill-only mode runs only prompts).
   Decode-only mode also has `reserve`: blocks are held for a prompt whose KV a KV receiver
   writes into `kv_cache` (all but a cached prefix, which the reservation takes from the
   prefix cache), then `admit_prefilled` hands over the first token.
2. `step()` = schedule -> run the model -> sample -> update. Each call returns the tokens
   produced this step, one `RequestOutput` per request that sampled.
3. A request leaves when it finishes (its last `RequestOutput` has `finished=True`) or is
   aborted. Either way its blocks are back in the block manager before the call returns,
   but for a prefill-only request added with `hold_kv`: it keeps them until `abort`.

Failures: a request whose own computation fails ends alone, in the step's outputs, with
`finish_reason` ERROR, no token, and `error` naming the cause ("sampling failed: the logits
hold NaN/inf"); its blocks are freed before `step` returns, and the other requests get the
tokens they would have got without it. A row's logits that are not finite, or an exception
while sampling a row, fail that row's request. An exception from the model's batched
forward (or from the step's KV hook) fails every request of that batch, since none of their
KV for the step can be trusted. Either way the engine serves on; only a fault in its own
bookkeeping (scheduler, block manager) propagates out of `step`.

Warm-up: `warm_up()`, on a fresh engine before it serves, runs a few requests through every
path its mode serves, so the first real request does not pay the process's one-time costs
(first use of each forward-pass kernel and of the decode kernels' small-row paths, the
allocator's first pages, lazy initialisation in torch and the sampler). It leaves no trace
a router or a test could see: every block free, the prefix cache empty and no prefix event
recorded (the cluster's prefix index never hears of its blocks), the load counters at zero,
the shared sampling generator untouched.

Modes: `set_mode` changes the mode of an engine that holds no request (a worker that
switches role: the same weights and KV cache, another scheduler mode); its prefix cache
stays, every block free.

Threading: one thread drives the engine (`step`, `add_request`, `abort`,
`admit_prefilled`, `stats`). `reserve` and `validate` may also be called from any other
thread, so a decode worker answers a reservation without waiting for the step in progress:
`reserve` takes only free blocks, which no running step reads or writes, under a lock that
`step` holds while it schedules and updates but not while the model runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig, EngineMode
from pdserve.engine.kv_cache import PagedKVCache, plan_layout
from pdserve.engine.model.llama import LayerKVHook
from pdserve.engine.request import Request
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampler import SampleFailure, Sampler
from pdserve.engine.scheduler import (
    RequestOutput,
    ReservedBlocks,
    ScheduledBatch,
    ScheduledRequest,
    Scheduler,
)
from pdserve.protocol import SamplingParams

# Given the step's batch before the model runs, returns the per-layer KV hook for that step
# (or None). Prefill workers use it to stream each layer's KV while later layers compute.
StepKVHook = Callable[[ScheduledBatch], LayerKVHook | None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmUp:
    """What a warm-up pass ran: its requests' prompt length, and the engine steps that
    prefilled and that decoded."""

    prompt_tokens: int
    prefill_steps: int
    decode_steps: int
    seconds: float


@dataclass(frozen=True)
class EngineStats:
    """Load counters a router reads to place requests."""

    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_reserved: int
    num_queued_prefill_tokens: int
    num_preemptions: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        q = self.num_prefix_query_tokens
        return self.num_prefix_hit_tokens / q if q else 0.0


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        layout = plan_layout(config.model, config.cache, config.torch_dtype)
        self.runner = ModelRunner(config, layout)
        self.block_manager = BlockManager(
            layout.num_blocks, layout.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            max_model_len=config.model.max_model_len,
            eos_token_ids=config.model.eos_token_ids,
        )
        self.sampler = Sampler(config.seed, self.runner.device)
        self._lock = threading.Lock()  # the scheduler's books: see Threading above

    @property
    def mode(self) -> EngineMode:
        return self.config.scheduler.mode

    def set_mode(self, mode: EngineMode) -> None:
        """Run in `mode` from the next call on (see Modes). Raises RuntimeError while the
        engine holds a request in any state (queued, running, reserved, held)."""
        with self._lock:
            if self.scheduler.requests:
                raise RuntimeError(f"cannot change mode with {len(self.scheduler.requests)} "
                                   "requests in the engine")
            scheduler = replace(self.config.scheduler, mode=mode)
            self.config = replace(self.config, scheduler=scheduler)
            self.scheduler.config = scheduler

    @property
    def kv_cache(self) -> PagedKVCache:
        return self.runner.kv_cache

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
        hold_kv: bool = False,
    ) -> None:
        """Queue a request. Raises ValueError for bad input; nothing is allocated then.

        `hold_kv` (prefill-only): once its first token is out, the request keeps its blocks
        (`kv_block_ids` names them) until `abort`, instead of freeing them in that step."""
        request = self._new_request(request_id, prompt_token_ids, params)
        if hold_kv and self.mode is not EngineMode.PREFILL_ONLY:
            raise ValueError(f"hold_kv needs a prefill-only engine, this one is {self.mode.value}")
        request.hold_kv = hold_kv
        with self._lock:
            self.scheduler.add(request)

    def kv_block_ids(self, request_id: str) -> list[int]:
        """The blocks that hold a live (or held) request's KV, in token order. Raises
        ValueError for an unknown id."""
        with self._lock:
            request = self.scheduler.requests.get(request_id)
            if request is None:
                raise ValueError(f"no request {request_id!r}")
            return list(request.block_ids)

    def reserve(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> ReservedBlocks:
        """Decode-only: hold blocks for the prompt's KV; which ones, and how much of the
        prompt they hold already.

        The prompt's longest cached prefix (whole blocks, never the last prompt token) is
        taken from the prefix cache, a reference per block, and fresh blocks are held for
        the rest. The caller writes the KV of positions [num_cached_tokens, n) into the
        fresh blocks of `kv_cache`, never into the cached ones, and then calls
        `admit_prefilled`, or gives up with `abort`. The engine keeps ownership of every
        block throughout and frees them itself (the cached ones go back to the cache,
        unreferenced); the caller never frees them. Because the references are taken here,
        a cached block cannot be evicted between this call and the request's end.
        Raises NoFreeBlocksError when they do not fit now, ValueError for bad input;
        nothing is held then. Callable from any thread (see Threading): a cached block it
        takes is full and registered, so no step writes it, and the lock keeps the cache's
        books consistent with the scheduler's.
        """
        request = self._new_request(request_id, prompt_token_ids, params)
        with self._lock:
            return self.scheduler.reserve(request)

    def admit_prefilled(self, request_id: str, first_token_id: int) -> RequestOutput:
        """Decode-only: the reserved request's KV is in place; decode from the next step on."""
        with self._lock:
            output = self.scheduler.admit_prefilled(request_id, first_token_id)
        if output.finished:
            self.sampler.forget(request_id)
        return output

    def warm_up(self, prompt_tokens: int = 64, decode_steps: int = 4) -> WarmUp:
        """See Warm-up. Two requests of `prompt_tokens` (a greedy one and a seeded sampled
        one, so both sampler paths run) prefill together, then decode together for
        `decode_steps` steps (none in prefill-only mode). Raises RuntimeError if the engine
        already served or holds anything, or if the pass left a block behind."""
        stats = self.stats()
        if (stats.num_free_blocks != stats.num_total_blocks or self.has_work()
                or stats.num_prefix_query_tokens):
            raise RuntimeError("warm_up needs a fresh engine")
        started = time.perf_counter()
        vocab = self.config.model.vocab_size
        n = max(1, min(prompt_tokens, self.config.model.max_model_len - decode_steps - 2,
                       self.block_manager.num_blocks * self.block_manager.block_size // 2
                       - decode_steps - 1))
        prompt = [(7919 * i + 1) % vocab for i in range(n)]
        common = dict(max_tokens=decode_steps + 1, ignore_eos=True)
        self.add_request("warm-up-greedy", prompt, SamplingParams(temperature=0.0, **common))
        self.add_request("warm-up-sampled", prompt, SamplingParams(
            temperature=0.8, top_k=20, top_p=0.9, seed=0, **common))
        prefills: list[bool] = []  # per step: whether it computed prompt tokens

        def note(batch: ScheduledBatch) -> None:
            prefills.append(any(i.start < i.request.num_prompt_tokens for i in batch.requests))

        while self.has_work():
            self.step(note)
        with self._lock:
            self.block_manager.reset_prefix_cache()
            s = self.scheduler
            s.num_preemptions = s.num_prefix_query_tokens = s.num_prefix_hit_tokens = 0
            stats = self._stats()
        if stats.num_free_blocks != stats.num_total_blocks:
            raise RuntimeError(f"warm-up left {stats.num_total_blocks - stats.num_free_blocks} "
                               "blocks in use")
        return WarmUp(n, sum(prefills), len(prefills) - sum(prefills),
                      time.perf_counter() - started)

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state, freeing its blocks. Idempotent (False if unknown)."""
        self.sampler.forget(request_id)
        with self._lock:
            return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, kv_hook: StepKVHook | None = None) -> list[RequestOutput]:
        """Run one step; see Failures for what a failed computation does."""
        with self._lock:
            batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        try:
            logits = self.runner.execute(batch, kv_hook(batch) if kv_hook else None)
        except Exception as e:  # noqa: BLE001 - the batch fails, the engine serves on
            log.exception("model step failed; failing its %d requests", len(batch.requests))
            reason = f"model step failed: {type(e).__name__}: {e}"
            return self._fail(batch.requests, [reason] * len(batch.requests))
        sampled, failed, reasons = self._sample(batch, logits)
        failures = self._fail(failed, reasons)
        with self._lock:
            outputs = self.scheduler.update(batch, sampled)
        for out in outputs:
            if out.finished:
                self.sampler.forget(out.request_id)
        return outputs + failures

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats()

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        """Block hashes that entered and left the prefix cache since the last call."""
        with self._lock:
            return self.block_manager.drain_prefix_events()

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or ValueError saying why this engine could never run
        it (empty, a token outside the vocabulary, longer than the model or the KV cache).
        Reads only fixed configuration: callable from any thread."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        tokens = [int(t) for t in prompt_token_ids]
        if not tokens:
            raise ValueError("prompt is empty")
        vocab = self.config.model.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        max_len = self.config.model.max_model_len
        if len(tokens) >= max_len:
            raise ValueError(f"prompt has {len(tokens)} tokens; the model's maximum length is "
                             f"{max_len}, which must leave room for at least one new token")
        bm = self.block_manager
        if bm.blocks_needed(len(tokens) + 1) > bm.num_blocks:
            raise ValueError(f"prompt has {len(tokens)} tokens; the KV cache holds only "
                             f"{bm.num_blocks * bm.block_size}")
        return tokens

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor
                ) -> tuple[list[int | None], list[ScheduledRequest], list[str]]:
        """The token of each batch item (None where it does not sample or its row failed),
        and the items whose row failed with the reasons."""
        sampling = [s for s in batch.requests if s.samples]
        try:
            results = self.sampler.sample(
                logits,
                [s.request.request_id for s in sampling],
                [s.request.sampling_params for s in sampling],
            )
        except Exception as e:  # noqa: BLE001 - no row can be read: all of them fail
            log.exception("sampling failed for a whole batch")
            results = [SampleFailure(f"{type(e).__name__}: {e}")] * len(sampling)
        rows = iter(results)
        sampled: list[int | None] = []
        failed: list[ScheduledRequest] = []
        reasons: list[str] = []
        for item in batch.requests:
            result = next(rows) if item.samples else None
            if isinstance(result, SampleFailure):
                log.warning("request %s: sampling failed: %s", item.request.request_id,
                            result.reason)
                failed.append(item)
                reasons.append(f"sampling failed: {result.reason}")
                result = None
            sampled.append(result)
        return sampled, failed, reasons

    def _fail(self, items: Sequence[ScheduledRequest], reasons: Sequence[str]
              ) -> list[RequestOutput]:
        """End each item's request with ERROR and its reason, freeing its blocks."""
        outputs = []
        with self._lock:
            for item, reason in zip(items, reasons, strict=True):
                out = self.scheduler.fail(item.request.request_id, reason)
                if out is not None:
                    outputs.append(out)
        for item in items:
            self.sampler.forget(item.request.request_id)
        return outputs

    def _stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_reserved=len(s.reserved),
            num_queued_prefill_tokens=s.num_queued_prefill_tokens,
            num_preemptions=s.num_preemptions,
            num_prefix_query_tokens=s.num_prefix_query_tokens,
            num_prefix_hit_tokens=s.num_prefix_hit_tokens,
        )

    def _new_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Request:
        return Request(request_id, self.validate(prompt_token_ids, params), params)
