"""Checks a GenerateRequest and turns it into what the router runs. Every refusal is an
InvalidField naming the request's field, which the server answers with INVALID_ARGUMENT.
Sampling is checked by the contract's SamplingParams itself; its field names get the
request's `sampling.` prefix here."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.protocol import InvalidField, SamplingParams
from pdserve.router.policy import Hint
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.rpc import pdserve_pb2 as pb

MAX_REQUEST_ID = 256
ROLES = ("system", "user", "assistant")
InvalidArgument = InvalidField  # what the server answers with INVALID_ARGUMENT


@dataclass(frozen=True)
class ValidRequest:
    request_id: str  # the client's, or "" (the router makes one)
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # its stop strings are the router's to match
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
    sampling = _sampling(req.sampling, limits.vocab_size)
    ttft = _slo(req.slo, "ttft_ms")
    tpot = _slo(req.slo, "tpot_ms")
    return ValidRequest(req.request_id, tuple(tokens), sampling, Hint(req.disaggregation),
                        ttft, tpot)


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
    if not value > 0:
        raise InvalidArgument(f"slo.{name}", f"must be > 0, got {value}")
    return value
