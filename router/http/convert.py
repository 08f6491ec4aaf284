"""An OpenAI-style JSON request, turned into the gRPC API's `GenerateRequest`, which the
router then validates and serves exactly as it would over gRPC (router.intake, router.router).
The validator names fields as the gRPC API spells them (`sampling.max_tokens`,
`token_ids[3]`); `client_field` spells them back as the JSON request did."""

from __future__ import annotations

import re

from pdserve.protocol import InvalidField
from pdserve.router.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Unsupported,
    _Sampling,
)
from pdserve.rpc import pdserve_pb2 as pb

_HINTS = {"auto": pb.DISAGGREGATION_AUTO, "always": pb.DISAGGREGATION_ALWAYS,
          "never": pb.DISAGGREGATION_NEVER}
# OpenAI's "developer" messages are what chat templates call "system"
_ROLES = {"developer": "system"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def completion_request(body: CompletionRequest, request_id: str) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise Unsupported("prompt", f"a batch of {len(prompt)} prompts is not supported; "
                                        "send one request per prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        _put(lambda: req.token_ids.extend(prompt), "prompt")
    _sampling(req, body, body.max_tokens, COMPLETION_MAX_TOKENS)
    return req


def chat_request(body: ChatCompletionRequest, request_id: str,
                 max_model_len: int) -> pb.GenerateRequest:
    """Without `max_tokens` a reply runs to EOS or the model's maximum length, as OpenAI's
    and vLLM's do."""
    req = pb.GenerateRequest(request_id=request_id)
    for i, m in enumerate(body.messages):
        for name in m.model_extra or {}:
            raise Unsupported(f"messages[{i}].{name}", "not supported by pdserve")
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise Unsupported(f"messages[{i}].content[{j}].type",
                                      f"{part.type!r} parts are not supported (text only)")
                for name in part.model_extra or {}:
                    raise Unsupported(f"messages[{i}].content[{j}].{name}",
                                      "not supported by pdserve")
            content = "".join(part.text for part in content)
        req.messages.add(role=_ROLES.get(m.role, m.role), content=content or "")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise Unsupported("max_completion_tokens", "set only one of max_tokens and "
                                                   "max_completion_tokens")
    given = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    _sampling(req, body, given, max_model_len)
    return req


def _sampling(req: pb.GenerateRequest, body: _Sampling, max_tokens: int | None,
              default_max_tokens: int) -> None:
    body.check_extras()
    s = req.sampling
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    top_k = None if body.top_k is None else 0 if body.top_k == -1 else body.top_k  # vLLM's -1
    for name, value in (("max_tokens", max_tokens), ("temperature", body.temperature),
                        ("top_p", body.top_p), ("top_k", top_k), ("seed", body.seed)):
        if value is not None:
            _put(lambda n=name, v=value: setattr(s, n, v), name)
    if body.stop is not None:
        s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    _put(lambda: s.stop_token_ids.extend(body.stop_token_ids or ()), "stop_token_ids")
    s.ignore_eos = body.ignore_eos
    req.disaggregation = _HINTS[body.disaggregation]
    if body.slo is not None:
        if body.slo.ttft_ms is not None:
            req.slo.ttft_ms = body.slo.ttft_ms
        if body.slo.tpot_ms is not None:
            req.slo.tpot_ms = body.slo.tpot_ms


def _put(assign, field: str) -> None:
    """A value the gRPC message cannot hold (an int past its 32 or 64 bits) is the
    client's error, named."""
    try:
        assign()
    except (ValueError, TypeError) as e:
        raise InvalidField(field, f"out of range ({e})") from e


def client_field(field: str, body: _Sampling) -> str:
    """The JSON name of a field the validator named in gRPC terms."""
    name = field.removeprefix("sampling.")
    name = re.sub(r"^token_ids", "prompt", name)
    if name.startswith("stop[") and isinstance(body.stop, str):
        return "stop"
    if name == "max_tokens" and isinstance(body, ChatCompletionRequest) \
            and body.max_tokens is None:
        return "max_completion_tokens"
    return name
