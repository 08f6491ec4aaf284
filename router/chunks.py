"""An attempt's stream: what the router's stream queue delivers for one transfer id,
turned into the token chunks of the request, or the failure that ends the attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pdserve.protocol import FinishReason, PrefillOutcome, PrefillStatus, TokenChunk
from pdserve.router.errors import worker_failed
from pdserve.router.retry import Held
from pdserve.router.view import Gone, LiveWorker


async def token_chunks(queue: asyncio.Queue, decode: LiveWorker, prefill: LiveWorker | None,
                       tid: str) -> AsyncIterator[TokenChunk]:
    """The request's token chunks until the last one. Raises UNAVAILABLE when the prefill
    fails before the hand-off (its outcome, or its worker's death), the decode job ends
    in an error, or the decode worker dies, so the caller aborts what is left. A decode
    side that fails before the hand-off leaves the prefill job holding its KV (HELD):
    the error names it (`held`) for the next attempt to re-send."""
    handed_off = prefill is None

    def decode_failed(why: str):
        held = None if handed_off else Held(prefill.worker_id, tid)
        return worker_failed(why, decode.worker_id, held=held)

    while True:
        item = await queue.get()
        if isinstance(item, Gone):
            if item.worker_id == decode.worker_id:
                raise decode_failed(f"worker {item.worker_id} is gone")
            if not handed_off:
                raise worker_failed(f"worker {item.worker_id} is gone", item.worker_id)
        elif isinstance(item, PrefillOutcome):
            if handed_off or item.status is PrefillStatus.DONE:
                continue
            if item.status is PrefillStatus.HELD:
                raise decode_failed(f"the KV transfer to {decode.worker_id} failed: "
                                    f"{item.reason}")
            raise worker_failed(f"prefill on {prefill.worker_id} failed: "
                                f"{item.reason}", prefill.worker_id)
        elif item.finish in (FinishReason.ERROR, FinishReason.ABORT):
            raise decode_failed(f"decode worker {decode.worker_id} ended the request: "
                                f"{item.error or item.finish.value}")
        else:
            handed_off = True
            yield item
            if item.finish is not None:
                return
