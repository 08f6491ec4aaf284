"""What a retried or migrated request carries from one dispatch to the next."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pdserve.protocol import TokenChunk
from pdserve.router.validate import ValidRequest


@dataclass(frozen=True)
class Held:
    """A prefill job that keeps its KV after its decode worker failed (protocol.orders,
    Re-sends): the next dispatch re-sends it from `prefill_id` instead of computing it."""

    prefill_id: str
    transfer_id: str


@dataclass
class Attempt:
    """What the final message needs of the dispatch that served a request."""

    dispatched: float
    decode_id: str
    prefill_id: str
    worker: TokenChunk  # the latest chunk with the decode worker's stamps


def continuation(req: ValidRequest, out_ids: list[int]) -> ValidRequest:
    """The request to dispatch after `out_ids` were streamed: prompt and tokens so far as
    the prompt, and only the tokens still allowed to come."""
    if not out_ids:
        return req
    sampling = replace(req.sampling, max_tokens=req.sampling.max_tokens - len(out_ids))
    return replace(req, prompt_token_ids=req.prompt_token_ids + tuple(out_ids),
                   sampling=sampling)
