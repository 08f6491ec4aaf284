"""Checks a GenerateRequest and turns it into what the router runs. Every refusal is an
InvalidField naming the request's field, which the server answers with INVALID_ARGUMENT.
Sizes are checked first, on the raw message (router.limits), then the input is tokenized
(a plain prompt with special tokens parsed, chat messages as text: router.tokenizer).
Sampling is checked by the contract's SamplingParams itself; its field names get the
request's `sampling.` prefix here.

`validate` may take seconds on a large input: the server runs it off the event loop
(router.intake). It is pure and thread-safe."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.protocol import InvalidField, ModelLimits, SamplingParams
from pdserve.router.limits import MAX_REQUEST_ID, InputLimits
from pdserve.router.policy import Hint
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.rpc import pdserve_pb2 as pb

ROLES = ("system", "user", "assistant")
InvalidArgument = InvalidField  # what the server answers with INVALID_ARGUMENT
DEFAULT_LIMITS = InputLimits()


@dataclass(frozen=True)
class ValidRequest:
    request_id: str  # the client's, or "" (the router makes one)
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # its stop strings are the router's to match
    hint: Hint
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None


def validate(req: pb.GenerateRequest, tok: RouterTokenizer,
             limits: InputLimits = DEFAULT_LIMITS) -> ValidRequest:
    check_sizes(req, limits, tok.limits)
    if req.disaggregation not in Hint._value2member_map_:
        raise InvalidArgument("disaggregation", f"unknown value {req.disaggregation}")
    sampling = _sampling(req.sampling, tok.limits.vocab_size)
    ttft = _slo(req.slo, "ttft_ms")
    tpot = _slo(req.slo, "tpot_ms")
    field, tokens = _input(req, tok)
    if len(tokens) >= tok.limits.max_model_len:
        raise InvalidArgument(field, f"the prompt has {len(tokens)} tokens; the model's maximum "
                                     f"length is {tok.limits.max_model_len}, which must leave "
                                     "room for at least one new token")
    return ValidRequest(req.request_id, tuple(tokens), sampling, Hint(req.disaggregation),
                        ttft, tpot)


def check_sizes(req: pb.GenerateRequest, limits: InputLimits, model: ModelLimits) -> None:
    """Raises InvalidField for the first field over its limit (router.limits; `token_ids`
    by the model's length). Cheap enough for the event loop, milliseconds for the largest
    request gRPC lets in: counts before contents, and a string's character count (a lower
    bound of its UTF-8 length) before its UTF-8 length."""
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidField("request_id", f"longer than {MAX_REQUEST_ID} characters")
    _check_text("prompt", req.prompt, limits.max_prompt_bytes)
    n = len(req.token_ids)
    if n >= model.max_model_len:
        raise InvalidField("token_ids", f"{n} tokens; the model's maximum length is "
                                        f"{model.max_model_len}, which must leave room for "
                                        "at least one new token")
    n = len(req.messages)
    if n > limits.max_messages:
        raise InvalidField("messages", f"{n} messages; at most {limits.max_messages} are "
                                       "allowed")
    total = 0
    for m in req.messages:
        total += len(m.content.encode())
        if total > limits.max_message_bytes:
            raise InvalidField("messages", f"their contents exceed {limits.max_message_bytes} "
                                           "bytes (UTF-8) together")
    s = req.sampling
    if len(s.stop) > limits.max_stop:
        raise InvalidField("sampling.stop", f"{len(s.stop)} stop strings; at most "
                                            f"{limits.max_stop} are allowed")
    for i, text in enumerate(s.stop):
        _check_text(f"sampling.stop[{i}]", text, limits.max_stop_bytes)
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidField("sampling.stop_token_ids",
                           f"{len(s.stop_token_ids)} ids; at most {limits.max_stop_token_ids} "
                           "are allowed")


def _check_text(field: str, text: str, limit: int) -> None:
    if len(text) > limit or len(text.encode()) > limit:
        raise InvalidField(field, f"longer than {limit} bytes (UTF-8)")


def _input(req: pb.GenerateRequest, tok: RouterTokenizer) -> tuple[str, list[int]]:
    given = [name for name, present in (("prompt", bool(req.prompt)),
                                        ("token_ids", bool(req.token_ids)),
                                        ("messages", bool(req.messages))) if present]
    if not given:
        raise InvalidArgument("prompt", "no input: set one of prompt, token_ids or messages")
    if len(given) > 1:
        raise InvalidArgument(given[1], f"set only one of prompt, token_ids and messages "
                                        f"(got {' and '.join(given)})")
    field = given[0]
    if field == "prompt":
        tokens = tok.encode(req.prompt)
        if not tokens:
            raise InvalidArgument("prompt", "encodes to no tokens")
        return field, tokens
    if field == "token_ids":
        vocab = tok.limits.vocab_size
        for i, t in enumerate(req.token_ids):
            if not 0 <= t < vocab:
                raise InvalidArgument(f"token_ids[{i}]", f"{t} is outside the vocabulary "
                                                         f"[0, {vocab})")
        return field, list(req.token_ids)
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role",
                                  f"{_excerpt(m.role)} is not one of {', '.join(ROLES)}")
    return field, tok.apply_chat_template([{"role": m.role, "content": m.content}
                                           for m in req.messages])


def _sampling(s: pb.SamplingParams, vocab: int) -> SamplingParams:
    def given(name: str, default):
        return getattr(s, name) if s.HasField(name) else default

    try:
        sampling = SamplingParams(
            max_tokens=given("max_tokens", 16), temperature=given("temperature", 1.0),
            top_k=given("top_k", 0), top_p=given("top_p", 1.0), seed=given("seed", None),
            stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos)
        sampling.check_vocab(vocab)
    except InvalidField as e:
        raise InvalidField(f"sampling.{e.field}", e.problem) from e
    return sampling


def _slo(slo: pb.Slo, name: str) -> float | None:
    if not slo.HasField(name):
        return None
    value = getattr(slo, name)
    if not (value > 0 and math.isfinite(value)):
        raise InvalidArgument(f"slo.{name}", f"must be a finite number > 0, got {value}")
    return value


def _excerpt(text: str, limit: int = 32) -> str:
    """A client's string quoted in an error, cut short: errors never echo a megabyte."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
