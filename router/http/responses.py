"""Response bodies of /v1/completions and /v1/chat/completions, whole or as server-sent
events: the router's token chunks and final message in OpenAI's shapes.

A stream is `data: {chunk}` events: the text as it comes (chat: a first event with the
assistant's role), then an event with the finish reason, then, when the request asked for
`stream_options.include_usage`, one with no choices and the usage, and `data: [DONE]`.
The last JSON event holds `pdserve`: the request's stage timings, where it ran, and its KV
transfer (an extension field; OpenAI's clients keep unknown fields).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import AsyncIterator

from google.protobuf.json_format import MessageToDict

from pdserve.rpc import pdserve_pb2 as pb

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
DONE = b"data: [DONE]\n\n"


class Endpoint(enum.Enum):
    COMPLETIONS = "text_completion"
    CHAT = "chat.completion"

    @property
    def id_prefix(self) -> str:
        return "cmpl" if self is Endpoint.COMPLETIONS else "chatcmpl"

    @property
    def chunk_object(self) -> str:
        return self.value if self is Endpoint.COMPLETIONS else "chat.completion.chunk"


def usage(final: pb.FinalResponse) -> dict:
    u = final.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def extension(final: pb.FinalResponse) -> dict:
    """pdserve's extension field: where the request ran and how long each stage took."""
    return {"request_id": final.request_id, "disaggregated": final.disaggregated,
            "prefill_worker": final.prefill_worker, "decode_worker": final.decode_worker,
            "attempts": final.attempts, "migrations": final.migrations,
            "kv_resends": final.kv_resends, "kv_transfer_bytes": final.kv_transfer_bytes,
            "timing": MessageToDict(final.timing, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)}


class Body:
    """The fields every body and chunk of one response shares."""

    def __init__(self, endpoint: Endpoint, request_id: str, model: str):
        self.endpoint = endpoint
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, final: pb.FinalResponse) -> dict:
        if self.endpoint is Endpoint.COMPLETIONS:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": FINISH.get(final.finish_reason)}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": FINISH.get(final.finish_reason)}
        return {**self._head(self.endpoint.value), "choices": [choice], "usage": usage(final),
                "pdserve": extension(final)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.endpoint is Endpoint.COMPLETIONS:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish}
        else:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self._head(self.endpoint.chunk_object), "choices": [choice]}

    def usage_chunk(self, final: pb.FinalResponse) -> dict:
        return {**self._head(self.endpoint.chunk_object), "choices": [], "usage": usage(final),
                "pdserve": extension(final)}


def event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def sse(body: Body, responses: AsyncIterator[pb.GenerateResponse],
              include_usage: bool) -> AsyncIterator[bytes]:
    """The events of a streamed response, from the router's responses."""
    if body.endpoint is Endpoint.CHAT:
        yield event(body.chunk("", role=True))
    async for response in responses:
        if response.HasField("chunk"):
            if response.chunk.text:
                yield event(body.chunk(response.chunk.text))
            continue
        final = response.final
        last = body.chunk(None if body.endpoint is Endpoint.CHAT else "",
                          FINISH.get(final.finish_reason))
        if include_usage:
            yield event(last)
            yield event(body.usage_chunk(final))
        else:
            yield event({**last, "pdserve": extension(final)})
    yield DONE
