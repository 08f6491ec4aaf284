"""How much one request may make the router read, render and tokenize.

Every size a client can inflate has a limit here, checked on the raw message (lengths of
strings in UTF-8 bytes, counts of repeated fields) before anything is tokenized, so an
oversized request is refused at once with INVALID_ARGUMENT naming the field and the limit,
and the tokenizer's work per request stays bounded. The prompt's length in tokens is
bounded by the model (`ModelLimits.max_model_len`), which also bounds `token_ids`.
`pdserve serve` sets these from its flags (deploy/input_flags.py); the client-side CLI
builds its parser from this module, so it imports nothing but the standard library. The
checks are router.validate.check_sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MIB = 1 << 20
MAX_REQUEST_ID = 256  # characters, not a flag: clients send short ids or none


@dataclass(frozen=True)
class InputLimits:
    # the whole serialized request; gRPC itself answers RESOURCE_EXHAUSTED above it
    max_request_bytes: int = 4 * MIB
    max_prompt_bytes: int = 1 * MIB
    max_messages: int = 2048  # chat messages per request (OpenAI's limit)
    max_message_bytes: int = 1 * MIB  # all chat messages' contents together
    max_stop: int = 16  # stop strings per request
    max_stop_bytes: int = 256  # each stop string; the detokenizer rescans this much per token
    max_stop_token_ids: int = 64
    # validation off the event loop: threads for requests up to `small_request_bytes`
    # serialized, and one lane of `large_threads` for bigger ones, so big inputs never
    # delay small ones; each lane queues at most `max_pending` requests
    tokenizer_threads: int = 2
    large_threads: int = 1
    small_request_bytes: int = 64 * 1024
    max_pending: int = 256
    max_pending_large: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")
