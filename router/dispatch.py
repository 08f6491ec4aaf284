"""One dispatch of a request (step 3 of router.router's life of a request): the workers
picked by the router queue, the orders sent, and everything undone when it fails.

Ownership: from the moment `dispatch` has its workers, the attempt's transfer id holds a
slot on each (`LiveWorker.in_flight`) and its prompt is in the prefill ledger (on the
prefill worker, or on the decode worker for a local prefill), so a placement made while
the orders are on the wire sees it ahead. `dispatch` returns with all three held; when it
raises or is cancelled, it has given back the slots and the ledger entry and aborted what
it had ordered, on both workers at once. After it returns, they are the caller's to give
back (`leave`, `PrefillLedger.ended`, `abort`). Aborts are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve.protocol import DecodeOrder, PrefillOrder
from pdserve.router.config import RouterConfig
from pdserve.router.errors import worker_failed
from pdserve.router.handles import NoRoom, NotServing, WorkerGone
from pdserve.router.ledger import PrefillLedger
from pdserve.router.placement import Route
from pdserve.router.queue import RouterQueue
from pdserve.router.retry import Held
from pdserve.router.stream import StreamReader
from pdserve.router.validate import ValidRequest
from pdserve.router.view import ClusterView, LiveWorker

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, config: RouterConfig, view: ClusterView, queue: RouterQueue,
                 ledger: PrefillLedger, stream: StreamReader):
        self.config, self.view, self.queue = config, view, queue
        self.ledger, self.stream = ledger, stream

    async def dispatch(self, req: ValidRequest, tid: str, disagg: bool, queue,
                       deadline: float | None, avoid: set[str], held: Held | None,
                       resends: list[Held], route: Route,
                       retry: bool) -> tuple[LiveWorker, LiveWorker | None, float]:
        """Wait for slots (and blocks), then reserve and submit the prefill job, or start a
        local prefill. Returns the decode worker, the prefill worker (None when local) and
        when the orders went out. A worker that turns out to be full (NoRoom) or switching
        roles (NotServing) before anything is held under `tid` is passed over and the
        request waits for another; a prefill worker that refuses after the decode worker
        reserved ends this dispatch (the reservation is aborted; UNAVAILABLE, retryable:
        the next dispatch has a new transfer id). A `held` prefill job is re-sent when its
        worker is the one picked (the queue prefers it), else aborted."""
        order = DecodeOrder(tid, req.prompt_token_ids, req.sampling, self.stream.endpoint,
                            self.config.lease_s, deadline)
        try:
            while True:
                decode, prefill = await self.queue.wait(
                    req, disagg, avoid, prefer_prefill=held.prefill_id if held else None,
                    retry=retry, deadline=route.deadline, hits=route.hits, slo=route.slo)
                decode.in_flight[tid] = queue
                if prefill is not None:
                    prefill.in_flight[tid] = queue
                # ahead of every later placement from now on, not from the orders' replies:
                # a burst's next request is placed while this one's reserve is on the wire
                self.ledger.started((prefill or decode).worker_id, tid,
                                    len(req.prompt_token_ids))
                dispatched = time.time()
                reserved = False
                try:
                    if prefill is None:
                        await self.call(decode, decode.handle.generate(order))
                        return decode, None, dispatched
                    reservation = await self.call(decode, decode.handle.reserve(order))
                    reserved = True
                    resend = held if held and held.prefill_id == prefill.worker_id else None
                    if resend is not None:
                        held = None  # the order below re-sends it or the worker ended it
                    if await self.call(prefill, prefill.handle.submit(PrefillOrder(
                            tid, req.prompt_token_ids, req.sampling, reservation.kv_endpoint,
                            self.stream.endpoint, deadline,
                            resend_of=resend.transfer_id if resend else "",
                            kv_start=reservation.num_cached_tokens))):
                        resends.append(resend)
                    return decode, prefill, dispatched
                except NoRoom:  # its heartbeat was stale: wait for room like the others
                    self.ledger.ended(tid)
                    leave(tid, decode, prefill)
                    decode.record = decode.record.without_room()
                except NotServing as e:  # a role switch the view had not seen yet
                    self.ledger.ended(tid)
                    leave(tid, decode, prefill)
                    if reserved:  # the reservation is under this id: a new dispatch
                        await asyncio.shield(self.abort(tid, decode, None))
                        raise worker_failed(str(e), prefill.worker_id) from e
                except BaseException:
                    self.ledger.ended(tid)
                    leave(tid, decode, prefill)
                    await asyncio.shield(self.abort(tid, decode, prefill))
                    raise
        finally:
            if held is not None:  # another worker (or none) prefills it: free what it holds
                await asyncio.shield(self.drop_held(held))

    async def call(self, worker: LiveWorker, call):
        """A handle call; a worker that cannot be reached leaves the view (UNAVAILABLE)."""
        try:
            return await call
        except NotServing:
            self.view.not_serving(worker.worker_id)
            raise
        except WorkerGone as e:
            self.view.drop(worker.worker_id)
            raise worker_failed(f"worker {worker.worker_id} is gone: {e}",
                                worker.worker_id) from e

    async def drop_held(self, held: Held | None) -> None:
        """Abort a held prefill job that no attempt re-sends."""
        worker = self.view.workers.get(held.prefill_id) if held else None
        if worker is not None:
            await self.abort(held.transfer_id, None, worker)

    async def abort(self, tid: str, decode: LiveWorker | None,
                    prefill: LiveWorker | None) -> None:
        """Abort on both workers at once; aborts are idempotent, and a worker that is gone
        has freed what it held."""
        workers = [w for w in (prefill, decode) if w is not None]
        results = await asyncio.gather(*(w.handle.abort(tid) for w in workers),
                                       return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, Exception):
                log.info("abort of %s on %s failed: %s", tid, worker.worker_id, result)


def leave(tid: str, *workers: LiveWorker | None) -> None:
    """The request's attempt `tid` no longer holds a job on these workers."""
    for w in workers:
        if w is not None:
            w.in_flight.pop(tid, None)
