"""A request's token-level state inside the engine.

Pure bookkeeping: no tensors. The scheduler owns every `Request`; the block ids in
`Request.block_ids` are references the scheduler holds in the block manager and gives back
when the request finishes, is aborted or is preempted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.protocol import FinishReason, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation of its tokens
    RUNNING = "running"  # in the batch: prefilling in chunks or decoding
    RESERVED = "reserved"  # decode-only: blocks held, prompt KV arriving from outside
    FINISHED_STOPPED = "stopped"  # EOS or a stop token
    FINISHED_LENGTH = "length"  # max_tokens or the model's maximum length
    # prefill-only, a request added with `hold_kv`: first token sampled, its blocks kept
    # (for the KV sender) until the caller aborts it
    HELD = "held"
    FINISHED_PREFILLED = "prefilled"  # prefill-only: first token sampled, KV handed off
    FINISHED_ABORTED = "aborted"
    FINISHED_ERROR = "error"  # its own computation failed (NaN logits, an exception)

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_PREFILLED,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


def finish_reason(status: RequestStatus) -> FinishReason | None:
    """Why a finished request's stream ends; None while it runs, and for a prefill-only
    request whose first token is out (it goes on, on a decode worker)."""
    return _REASONS.get(status)


_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
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
    hold_kv: bool = False  # prefill-only: keep the blocks after the first token (HELD)

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
