"""How a request ends short of its final message: a gRPC status and whether another
worker may serve it (router.router's retries act on `retryable`)."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.observe import Shortage
from pdserve.router.retry import Held
from pdserve.router.view import LiveWorker


class RequestError(Exception):
    """Ends a request with a gRPC status; `code` is a grpc.StatusCode name. `retryable`:
    a worker failed the request (another may serve it); `worker_ids`: the workers at
    fault, when known; `short_of`: what a refusal says the cluster lacks."""

    def __init__(self, code: str, message: str, retryable: bool = False,
                 worker_ids: tuple[str, ...] = (), held: Held | None = None,
                 short_of: Shortage | None = None):
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.worker_ids = worker_ids
        self.held = held  # the failed attempt's prefill job keeps its KV for a re-send
        self.short_of = short_of


def overloaded(message: str, short_of: Shortage = Shortage.PREFILL) -> RequestError:
    """A refusal at admission, for lack of `short_of`."""
    return RequestError("RESOURCE_EXHAUSTED", message, short_of=short_of)


def unavailable(message: str) -> RequestError:
    return RequestError("UNAVAILABLE", message)


def worker_failed(message: str, *worker_ids: str, held: Held | None = None) -> RequestError:
    """A worker failed the request: UNAVAILABLE, and another worker may serve it."""
    return RequestError("UNAVAILABLE", message, retryable=True, worker_ids=worker_ids,
                        held=held)


def check_fits(workers: Sequence[LiveWorker], num_prompt_tokens: int) -> None:
    """A prompt no worker could ever hold is refused now instead of waiting forever."""
    capacity = max(w.record.total_blocks * w.record.block_size for w in workers)
    if num_prompt_tokens + 1 > capacity:
        raise RequestError("INVALID_ARGUMENT", f"prompt: {num_prompt_tokens} tokens need more "
                                               f"KV than any worker holds ({capacity} tokens)")
