"""Continuous batching with chunked prefill, prefix caching and preemption.

Life of a request in the scheduler:
1. WAITING    `add` queues it (FCFS). A preempted request goes back to the head of the queue.
2. (RESERVED) decode-only: `reserve` holds blocks for a prompt whose KV is written from
              outside; `admit_prefilled` moves it to RUNNING with its first token.
3. RUNNING    each step gives it `min(uncomputed tokens, budget left)` tokens: a prompt is
              prefilled in chunks, then it decodes one token per step. Admission first takes
              the longest cached prefix (full blocks) from the block manager.
4. FINISHED   EOS, a stop token, max_tokens or the model's length (prefill-only: after the
              first token). Its blocks are freed in the same step; computed full blocks stay
              in the prefix cache until evicted. `fail` ends a request whose computation
              failed the same way, with an error instead of a token.
   (HELD)     prefill-only, added with `hold_kv`: after the first token its output says
              finished, but it keeps its blocks (nothing schedules it) until `abort`: a
              prefill worker re-sends that KV if its first receiver fails.

Each step schedules running requests first (decodes cost one token each, so they are never
starved by a long prompt, as in Sarathi-Serve), then admits waiting ones while the token
budget and `max_num_seqs` allow (a prefill-only engine packs prompts into a step only up
to `prefill_pack_tokens`). When blocks run out, the newest running request is
preempted by recompute: its blocks are freed and it is re-queued, so the engine never
deadlocks and never writes into a block another request owns.

Ownership: the scheduler holds exactly one block-manager reference per id in each live
request's `block_ids` and gives it back when the request leaves (finish, abort, preempt).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.config import EngineMode, SchedulerConfig
from pdserve.engine.request import Request, RequestStatus, finish_reason
from pdserve.protocol import FinishReason, hash_block


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int  # first token position computed this step
    num_new_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether this step computes the request's last known token, so it samples one."""
        return self.end == self.request.num_tokens


@dataclass(frozen=True)
class ScheduledBatch:
    requests: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass(frozen=True)
class ReservedBlocks:
    """A decode-only reservation: the blocks that hold the prompt's first
    `num_cached_tokens` tokens already (prefix-cache hits, whole blocks) and the fresh ones
    for positions [num_cached_tokens, prompt length), in token order."""

    cached_block_ids: tuple[int, ...]
    fresh_block_ids: tuple[int, ...]
    num_cached_tokens: int

    @property
    def block_ids(self) -> list[int]:
        return [*self.cached_block_ids, *self.fresh_block_ids]


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None = None  # see engine.request.finish_reason
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served
    error: str = ""  # why, when finish_reason is ERROR


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        eos_token_ids: Sequence[int],
    ):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: dict[str, Request] = {}
        self.held: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # -- entry points ------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self._check_new(request)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def reserve(self, request: Request) -> ReservedBlocks:
        """Decode-only: hold blocks for the prompt's KV, which the caller writes in.

        The prompt's longest cached prefix (full blocks, never the last prompt token, as in
        a local prefix hit) is taken from the prefix cache with a reference per block;
        fresh blocks hold the rest. The caller writes only the fresh blocks. The scheduler
        keeps every reference, so no cached block is evicted before the request ends, and
        the request must end with `admit_prefilled` or `abort`; either way the scheduler
        frees the blocks (the cached ones stay cached), never the caller.
        Raises NoFreeBlocksError when the prompt does not fit now; nothing is held then.
        """
        if self.config.mode is not EngineMode.DECODE_ONLY:
            raise ValueError(f"reserve needs a decode-only engine, this one is {self.config.mode}")
        self._check_new(request)
        bm = self.block_manager
        hits, hashes = bm.match_prefix(request.all_token_ids,
                                       (request.num_prompt_tokens - 1) // bm.block_size)
        num_fresh = bm.blocks_needed(request.num_prompt_tokens) - len(hits)
        if num_fresh > bm.num_free_after_acquire(hits):
            raise NoFreeBlocksError(f"asked for {num_fresh} blocks beside {len(hits)} cached, "
                                    f"{bm.num_free_after_acquire(hits)} free")
        bm.acquire(hits)
        fresh = bm.allocate(num_fresh)
        request.block_ids = hits + fresh
        request.block_hashes = hashes
        request.num_cached_tokens = len(hits) * bm.block_size
        self.num_prefix_query_tokens += request.num_prompt_tokens
        self.num_prefix_hit_tokens += request.num_cached_tokens
        request.status = RequestStatus.RESERVED
        self.requests[request.request_id] = request
        self.reserved[request.request_id] = request
        return ReservedBlocks(tuple(hits), tuple(fresh), request.num_cached_tokens)

    def admit_prefilled(self, request_id: str, first_token_id: int) -> RequestOutput:
        """Decode-only: the prompt's KV is in the reserved blocks; start decoding.

        The prompt's full blocks join the prefix cache. If the first token already ends the
        request (EOS, max_tokens=1), it finishes here and its blocks are freed.
        """
        request = self.reserved.pop(request_id, None)
        if request is None:
            raise ValueError(f"no reservation for request {request_id!r}")
        request.num_computed_tokens = request.num_prompt_tokens
        self._register_full_blocks(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return self._append_token(request, first_token_id)

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state and free its blocks. Idempotent: False if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.RESERVED:
            del self.reserved[request_id]
        elif request.status is RequestStatus.HELD:
            del self.held[request_id]
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        """End a running request whose computation failed, freeing its blocks; its final
        output (no token, ERROR, `error`). None if it is not running (aborted meanwhile).
        Blocks it filled in the failed step were never registered in the prefix cache, so
        no other request can read what the failure left in them."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            return None
        self.running.remove(request)
        self._finish(request, RequestStatus.FINISHED_ERROR)
        return RequestOutput(request_id, (), finished=True, finish_reason=FinishReason.ERROR,
                             num_cached_tokens=request.num_cached_tokens, error=error)

    # -- one step ----------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_uncomputed_tokens, budget)
            while not self._grow(request, request.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_new))
            budget -= num_new
            i += 1

        pack = (self.config.prefill_pack_tokens
                if self.config.mode is EngineMode.PREFILL_ONLY else None)
        while (
            self.waiting
            and budget > 0
            and not preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            # a prompt joins another's prefill step only whole and within the pack limit:
            # a chunk of it there would delay the other's first token and not bring its own
            # (the prefix-cache lookup only for a prompt that does not fit as it stands)
            head = self.waiting[0]
            if pack is not None and scheduled:
                room = pack - (self.config.max_num_batched_tokens - budget)
                if head.num_tokens > room and self._uncached_tokens(head) > room:
                    break
            admitted = self._admit(head, budget)
            if admitted is None:
                break
            self.waiting.popleft()
            self.running.append(admitted.request)
            scheduled.append(admitted)
            budget -= admitted.num_new_tokens

        return ScheduledBatch(scheduled, preempted)

    def update(
        self, batch: ScheduledBatch, sampled_token_ids: Sequence[int | None]
    ) -> list[RequestOutput]:
        """Record a step's results. `sampled_token_ids[i]` is the token sampled for
        `batch.requests[i]`, or None where that request did not sample this step."""
        outputs = []
        for item, token_id in zip(batch.requests, sampled_token_ids, strict=True):
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while its step ran
            request.num_computed_tokens = item.end
            self._register_full_blocks(request)
            if token_id is not None:
                outputs.append(self._append_token(request, token_id))
        return outputs

    # -- counters ----------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed (waiting and partly prefilled requests)."""
        waiting = sum(r.num_tokens for r in self.waiting)
        return waiting + sum(r.num_uncomputed_tokens for r in self.running if r.is_prefilling)

    # -- internals ---------------------------------------------------------------------

    def _check_new(self, request: Request) -> None:
        """The engine validated the prompt (Engine.validate); the id is the scheduler's."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")

    def _cached_prefix(self, request: Request) -> tuple[list[int], list[int]]:
        """The request's leading blocks the prefix cache holds (no state changes)."""
        bm = self.block_manager
        # Keep the last token out of the cache lookup: it must be computed to sample.
        return bm.match_prefix(request.all_token_ids, (request.num_tokens - 1) // bm.block_size)

    def _uncached_tokens(self, request: Request) -> int:
        return request.num_tokens - len(self._cached_prefix(request)[0]) * (
            self.block_manager.block_size)

    def _admit(self, request: Request, budget: int) -> ScheduledRequest | None:
        bm = self.block_manager
        hits, hashes = self._cached_prefix(request)
        num_cached = len(hits) * bm.block_size
        num_new = min(request.num_tokens - num_cached, budget)
        num_fresh = bm.blocks_needed(num_cached + num_new) - len(hits)
        if num_fresh > bm.num_free_after_acquire(hits):
            return None
        bm.acquire(hits)
        request.block_ids = hits + bm.allocate(num_fresh)
        request.block_hashes = hashes
        request.num_computed_tokens = num_cached
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_cached
            self.num_prefix_query_tokens += request.num_prompt_tokens
            self.num_prefix_hit_tokens += num_cached
        request.status = RequestStatus.RUNNING
        return ScheduledRequest(request, num_cached, num_new)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        bm = self.block_manager
        missing = bm.blocks_needed(num_tokens) - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > bm.num_free_blocks:
            return False
        request.block_ids += bm.allocate(missing)
        return True

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.block_ids)
        request.block_ids = []
        request.block_hashes = []
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _register_full_blocks(self, request: Request) -> None:
        bm = self.block_manager
        bs = bm.block_size
        num_full = request.num_computed_tokens // bs
        while len(request.block_hashes) < num_full:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if request.block_hashes else None
            tokens = request.token_ids_slice(i * bs, (i + 1) * bs)
            block_hash = hash_block(parent, tokens)
            bm.register(request.block_ids[i], block_hash, tokens)
            request.block_hashes.append(block_hash)

    def _append_token(self, request: Request, token_id: int) -> RequestOutput:
        request.output_token_ids.append(token_id)
        status = self._stop_status(request, token_id)
        if status is RequestStatus.FINISHED_PREFILLED and request.hold_kv:
            self.running.remove(request)
            request.status = RequestStatus.HELD
            self.held[request.request_id] = request
        elif status is not None:
            self.running.remove(request)
            self._finish(request, status)
        return RequestOutput(
            request.request_id,
            (token_id,),
            finished=status is not None,
            finish_reason=finish_reason(status) if status else None,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if self.config.mode is EngineMode.PREFILL_ONLY:
            return RequestStatus.FINISHED_PREFILLED
        if params.stops_on(token_id, self.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.block_manager.free(request.block_ids)
        request.block_ids = []
        request.status = status
        del self.requests[request.request_id]


__all__ = [
    "NoFreeBlocksError",
    "RequestOutput",
    "ReservedBlocks",
    "ScheduledBatch",
    "ScheduledRequest",
    "Scheduler",
]
