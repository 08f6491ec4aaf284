"""The router's front door: requests are validated and tokenized off the event loop.

A 1 MiB prompt takes seconds to tokenize on a slow core; on the event loop it would stall
every stream the router serves. So:
1. CHECKED   on the loop, the sizes of the raw message against router.limits
             (router.validate.check_sizes: counts, then UTF-8 lengths; milliseconds for
             the largest request gRPC lets in). Over a limit: InvalidField at once,
             nothing tokenized.
2. QUEUED    in one of two bounded thread pools, by serialized size: small requests
             (the common case) never wait behind large ones. A lane that already holds
             its `max_pending` requests refuses with IntakeFull (RESOURCE_EXHAUSTED).
3. VALIDATED in the pool thread (router.validate): tokenizing releases the GIL
             (router.tokenizer), jinja rendering yields it every switch interval.
A request whose client goes away leaves its lane at once while it still waits; one already
being validated counts until its thread is done with it, so the bound counts real work.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

from pdserve.router.limits import InputLimits
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.router.validate import ValidRequest, check_sizes, validate
from pdserve.rpc import pdserve_pb2 as pb


class IntakeFull(Exception):
    """Too many requests are waiting to be validated; the server answers
    RESOURCE_EXHAUSTED."""


class _Lane:
    def __init__(self, name: str, threads: int, max_pending: int):
        self.name = name
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"intake-{name}")
        self.max_pending = max_pending
        self.pending = 0
        self._lock = threading.Lock()  # pending is released from pool threads

    def submit(self, fn, *args) -> Future:
        with self._lock:
            if self.pending >= self.max_pending:
                raise IntakeFull(f"the router is already validating {self.pending} {self.name} "
                                 "requests; try again later")
            self.pending += 1
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self._lock:
            self.pending -= 1


class Intake:
    """Validates requests for the server's handlers, which await `validate` on the loop."""

    def __init__(self, tokenizer: RouterTokenizer, limits: InputLimits):
        self.tokenizer = tokenizer
        self.limits = limits
        self._small = _Lane("small", limits.tokenizer_threads, limits.max_pending)
        self._large = _Lane("large", limits.large_threads, limits.max_pending_large)
        # the pools' threads end with the Intake, however the server that owns it ends
        for lane in (self._small, self._large):
            weakref.finalize(self, lane.pool.shutdown, wait=False, cancel_futures=True)

    async def validate(self, req: pb.GenerateRequest) -> ValidRequest:
        """Raises InvalidField (bad input) or IntakeFull."""
        check_sizes(req, self.limits, self.tokenizer.limits)
        small = req.ByteSize() <= self.limits.small_request_bytes
        lane = self._small if small else self._large
        future = lane.submit(validate, req, self.tokenizer, self.limits)
        return await asyncio.wrap_future(future)

    async def run(self, fn, *args, size: int):
        """Any other work on a request of `size` bytes (e.g. diagnosing undecodable bytes),
        in the lane that size picks."""
        lane = self._small if size <= self.limits.small_request_bytes else self._large
        return await asyncio.wrap_future(lane.submit(fn, *args))
