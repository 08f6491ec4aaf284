"""A request's token-level state inside the engine, and its sampling parameters.

Pure bookkeeping: no tensors. The scheduler owns every `Request`; the block ids in
`Request.block_ids` are references the scheduler holds in the block manager and gives back
when the request finishes, is aborted or is preempted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable
    those filters. `stop` strings are matched on text by the caller that detokenizes
    (`LLM`, the router); the engine itself stops on `stop_token_ids`, EOS and `max_tokens`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        # Accept lists from callers but keep the dataclass hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation of its tokens
    RUNNING = "running"  # in the batch: prefilling in chunks or decoding
    RESERVED = "reserved"  # decode-only: blocks held, prompt KV arriving from outside
    FINISHED_STOPPED = "stopped"  # EOS or a stop token
    FINISHED_LENGTH = "length"  # max_tokens or the model's maximum length
    FINISHED_PREFILLED = "prefilled"  # prefill-only: first token sampled, KV handed off
    FINISHED_ABORTED = "aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_PREFILLED,
    RequestStatus.FINISHED_ABORTED,
}


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    PREFILLED = "prefilled"
    ABORT = "abort"

    @classmethod
    def of(cls, status: RequestStatus) -> FinishReason | None:
        return _REASONS.get(status)


_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_PREFILLED: FinishReason.PREFILLED,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass
class Request:
    """Token state of one request.

    Invariant: `num_computed_tokens <= num_tokens`. The KV of the first
    `num_computed_tokens` tokens is in `block_ids`. A step that brings `num_computed_tokens`
    up to `num_tokens` samples the next token.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Hashes of the leading full blocks whose KV is computed (the prefix-cache chain).
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.all_token_ids[start:end]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until the KV of every token but the newest is computed."""
        return self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0
