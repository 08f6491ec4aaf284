"""Checks a GenerateRequest and turns it into what the router runs. Every refusal is an
InvalidArgument naming the field, which the server answers with INVALID_ARGUMENT."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.router.jobs import Sampling
from pdserve.router.policy import Hint
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.rpc import pdserve_pb2 as pb

MAX_STOP_STRINGS = 16
MAX_REQUEST_ID = 256
ROLES = ("system", "user", "assistant")


class InvalidArgument(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class ValidRequest:
    request_id: str  # the client's, or "" (the router makes one)
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    stop: tuple[str, ...]
    hint: Hint
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None


def validate(req: pb.GenerateRequest, tok: RouterTokenizer) -> ValidRequest:
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"longer than {MAX_REQUEST_ID} characters")
    field, tokens = _input(req, tok)
    limits = tok.limits
    if len(tokens) >= limits.max_model_len:
        raise InvalidArgument(field, f"the prompt has {len(tokens)} tokens; the model's maximum "
                                     f"length is {limits.max_model_len}, which must leave room "
                                     "for at least one new token")
    if req.disaggregation not in Hint._value2member_map_:
        raise InvalidArgument("disaggregation", f"unknown value {req.disaggregation}")
    sampling, stop = _sampling(req.sampling, limits.vocab_size)
    ttft = _slo(req.slo, "ttft_ms")
    tpot = _slo(req.slo, "tpot_ms")
    return ValidRequest(req.request_id, tuple(tokens), sampling, stop,
                        Hint(req.disaggregation), ttft, tpot)


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
        for i, t in enumerate(req.token_ids):
            if not 0 <= t < tok.limits.vocab_size:
                raise InvalidArgument(f"token_ids[{i}]", f"{t} is outside the vocabulary "
                                                         f"[0, {tok.limits.vocab_size})")
        return field, list(req.token_ids)
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role",
                                  f"{m.role!r} is not one of {', '.join(ROLES)}")
    try:
        return field, tok.apply_chat_template([{"role": m.role, "content": m.content}
                                               for m in req.messages])
    except ValueError as e:
        raise InvalidArgument("messages", str(e).removeprefix("messages: ")) from e


def _sampling(s: pb.SamplingParams, vocab: int) -> tuple[Sampling, tuple[str, ...]]:
    max_tokens = s.max_tokens if s.HasField("max_tokens") else 16
    if max_tokens < 1:
        raise InvalidArgument("sampling.max_tokens", f"must be >= 1, got {max_tokens}")
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InvalidArgument("sampling.temperature", f"must be >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 disables it), got {top_k}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, text in enumerate(s.stop):
        if not text:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
    for i, t in enumerate(s.stop_token_ids):
        if not 0 <= t < vocab:
            raise InvalidArgument(f"sampling.stop_token_ids[{i}]",
                                  f"{t} is outside the vocabulary [0, {vocab})")
    sampling = Sampling(max_tokens, float(temperature), float(top_p), top_k,
                        s.seed if s.HasField("seed") else None, tuple(s.stop_token_ids),
                        s.ignore_eos)
    return sampling, tuple(s.stop)


def _slo(slo: pb.Slo, name: str) -> float | None:
    if not slo.HasField(name):
        return None
    value = getattr(slo, name)
    if not value > 0:
        raise InvalidArgument(f"slo.{name}", f"must be > 0, got {value}")
    return value
