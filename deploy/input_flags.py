"""`pdserve serve` flags for the router's input limits (router.limits.InputLimits)."""

from __future__ import annotations

import argparse

from pdserve.router.limits import InputLimits

_DEFAULTS = InputLimits()
# flag (without --), InputLimits field, help
_FLAGS = [
    ("max-request-bytes", "max_request_bytes",
     "largest serialized request gRPC accepts; larger ones get RESOURCE_EXHAUSTED"),
    ("max-prompt-bytes", "max_prompt_bytes", "longest `prompt`, in UTF-8 bytes"),
    ("max-messages", "max_messages", "most chat messages in one request"),
    ("max-message-bytes", "max_message_bytes",
     "all chat message contents of one request together, in UTF-8 bytes"),
    ("max-stop-strings", "max_stop", "most stop strings in one request"),
    ("max-stop-bytes", "max_stop_bytes", "longest stop string, in UTF-8 bytes"),
    ("max-stop-token-ids", "max_stop_token_ids", "most stop token ids in one request"),
    ("tokenizer-threads", "tokenizer_threads",
     "threads that validate and tokenize requests off the router's event loop (one more "
     f"takes those over {_DEFAULTS.small_request_bytes // 1024} KiB)"),
]


def add_input_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "request limits", "what one request may make the router read and tokenize; a request "
                          "over a limit gets INVALID_ARGUMENT naming the field, before any "
                          "tokenizing")
    for flag, name, text in _FLAGS:
        group.add_argument(f"--{flag}", dest=name, type=_positive,
                           default=getattr(_DEFAULTS, name), metavar="N",
                           help=f"{text} (%(default)s)")


def input_limits(args: argparse.Namespace) -> InputLimits:
    return InputLimits(**{name: getattr(args, name) for _, name, _ in _FLAGS})


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
