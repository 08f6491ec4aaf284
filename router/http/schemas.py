"""The JSON bodies of the OpenAI-compatible endpoints: the fields pdserve serves, named as
OpenAI and vLLM name them, plus pdserve's own (`disaggregation`, `slo`).

A field OpenAI accepts but pdserve does not serve is refused with a 400 naming it unless
it holds the value that asks for nothing (`n: 1`, `logprobs: null`, `tools: []`, ...); a
field nobody defines is refused too. Nothing a client asks for is silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# value(s) of an unsupported field that ask for nothing pdserve would have to do
_NO_OP: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
    "top_logprobs": (None, 0), "suffix": (None, ""), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "repetition_penalty": (None, 1), "min_p": (None, 0),
    "min_tokens": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "response_format": (None, {"type": "text"}),
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto"),
    "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "prompt_logprobs": (None, 0),
    "modalities": (None, ["text"]), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "echo_prompt": (None, False),
    "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "documents": (None, []),
}
# fields that only name or tag the caller: accepted, with nothing to serve
_TAGS = {"user", "safety_identifier", "prompt_cache_key"}


class Unsupported(Exception):
    """A field pdserve refuses; `field` names it as the client sent it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class Slo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = None
    tpot_ms: float | None = None


class _Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's; -1 and 0 disable it
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # pdserve's own
    disaggregation: Literal["auto", "always", "never"] = "auto"
    slo: Slo | None = None

    def check_extras(self) -> None:
        """Raises Unsupported for an extra field that asks for something not served."""
        for name, value in (self.model_extra or {}).items():
            if name in _TAGS:
                continue
            if name not in _NO_OP:
                raise Unsupported(name, "unknown field")
            if not any(_same(value, ok) for ok in _NO_OP[name]):
                raise Unsupported(name, f"not supported by pdserve (got {value!r})")


def _same(value, ok) -> bool:
    """JSON equality that keeps booleans and null apart from numbers (`1 == True`)."""
    if ok is None or isinstance(ok, bool) or isinstance(value, bool):
        return value is ok
    return value == ok


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(BaseModel):
    """A part of a message's content; only text is served (router.http.convert)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
