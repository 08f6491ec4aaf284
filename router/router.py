"""The request lifecycle (DESIGN §2) over the workers the Redis registry lists.

Life of a request:
1. ADMITTED    `generate` counts it in the router queue; a full queue answers
               RESOURCE_EXHAUSTED at once (Overloaded) instead of queueing without bound.
2. QUEUED      it waits until a worker of each role it needs has a free slot (at most
               `max_in_flight_per_worker` requests per worker from this router) and, for
               decode, the blocks. No live worker of a needed role: UNAVAILABLE.
3. DISPATCHED  the router opens the request's token-stream queue, then either reserves
               on a decode worker and submits the prefill job naming its KV endpoint
               (disaggregated), or has the decode/colocated worker prefill locally.
4. STREAMING   chunks from the decode worker are detokenized incrementally and yielded;
               a stop string ends the request here (the decode job is aborted).
5. FINISHED    the last chunk (stop, length) gives the final message with usage and timing.
   FAILED      the prefill job failed, the KV never arrived, or a worker died (the handle
               raised WorkerGone, or its registry entry expired): UNAVAILABLE.
   CANCELLED   the client went away or its deadline passed: the caller cancels the task.
On every exit but FINISHED the router aborts the job on both workers, so every block is
freed on both sides; the slots are given back in all cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pdserve.router.detok import IncrementalDetokenizer
from pdserve.router.final import final_response
from pdserve.router.handles import NoRoom, WorkerGone
from pdserve.router.jobs import DecodeOrder, PrefillOrder, PrefillOutcome, PrefillStatus
from pdserve.router.policy import (
    WorkerLoad,
    choose_decode,
    choose_prefill,
    round_robin,
    should_disaggregate,
)
from pdserve.router.prefix import block_hashes
from pdserve.router.registry import WorkerRecord, live_workers, prefix_hits
from pdserve.router.stream import StreamChunk, TokenStreamReader
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.router.validate import ValidRequest
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)


class Policy(enum.Enum):
    LOAD = "load"  # least loaded, prefix-aware (router.policy)
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class RouterConfig:
    router_id: str = "router-0"
    stream_host: str = "127.0.0.1"  # the token-stream endpoint binds here; must be routable
    disaggregation_threshold: int = 128  # prompt tokens; `auto` prefills shorter ones locally
    max_in_flight_per_worker: int = 32
    max_queue: int = 256  # requests waiting for a worker slot
    lease_s: float = 30.0  # how long a decode reservation waits for the KV
    refresh_s: float = 0.5  # registry poll period
    policy: Policy = Policy.LOAD


class RequestError(Exception):
    """Ends a request with a gRPC status; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def overloaded(message: str) -> RequestError:
    return RequestError("RESOURCE_EXHAUSTED", message)


def unavailable(message: str) -> RequestError:
    return RequestError("UNAVAILABLE", message)


@dataclass(eq=False)
class _Worker:
    record: WorkerRecord
    handle: object
    in_flight: dict[str, asyncio.Queue] = field(default_factory=dict)  # transfer id -> stream

    def load(self) -> WorkerLoad:
        r = self.record
        return WorkerLoad(r.worker_id, r.free_blocks, r.total_blocks, r.block_size, r.running,
                          r.waiting, r.queued_prefill_tokens, len(self.in_flight))


class _Gone:
    """Put in a request's stream queue when its worker disappears."""

    def __init__(self, worker_id: str):
        self.worker_id = worker_id


HandleFactory = Callable[[WorkerRecord], object]


class Router:
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, redis,
                 connect: HandleFactory):
        self.config = config
        self.tokenizer = tokenizer
        self.redis = redis
        self._connect = connect
        self.stream = TokenStreamReader(config.stream_host)
        self.workers: dict[str, _Worker] = {}
        self._changed = asyncio.Condition()
        self._queued = 0
        self._turn = itertools.count()
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        self.stream.start()
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.stream.close()

    # -- registry ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Take the registry's view: new workers join, expired ones leave (and their
        in-flight requests fail with UNAVAILABLE)."""
        records = {r.worker_id: r for r in await live_workers(self.redis)}
        for worker_id, worker in list(self.workers.items()):
            record = records.get(worker_id)
            if record is None or record.started != worker.record.started:
                self._drop(worker_id)  # gone, or restarted: what it held is lost
        for worker_id, record in records.items():
            known = self.workers.get(worker_id)
            if known is None:
                try:
                    handle = self._connect(record)
                except Exception as e:  # noqa: BLE001 - one unreachable worker is not fatal
                    log.error("cannot reach worker %s: %s", worker_id, e)
                    continue
                self.workers[worker_id] = _Worker(record, handle)
            else:
                known.record = record
        async with self._changed:
            self._changed.notify_all()

    def _drop(self, worker_id: str) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        log.warning("worker %s left the registry; failing its %d requests", worker_id,
                    len(worker.in_flight))
        for q in worker.in_flight.values():
            q.put_nowait(_Gone(worker_id))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving on the last known view
                log.error("registry refresh failed: %s", e)

    def _role(self, *roles: str) -> list[_Worker]:
        return [w for w in self.workers.values() if w.record.role in roles]

    # -- a request ---------------------------------------------------------------------------

    async def generate(self, req: ValidRequest) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.time()
        request_id = req.request_id or f"req-{uuid.uuid4().hex[:12]}"
        tid = f"{request_id}/{uuid.uuid4().hex[:8]}"  # one per attempt, router-owned
        n = len(req.prompt_token_ids)
        disagg = should_disaggregate(req.hint, n, self.config.disaggregation_threshold,
                                     bool(self._role("prefill")))
        queue = self.stream.open(tid)
        decode = prefill = None
        prefill_task: asyncio.Task | None = None
        finished = False
        try:
            decode, prefill, endpoint = await self._dispatch(req, tid, disagg, queue)
            dispatched = time.time()
            if prefill is not None:
                order = PrefillOrder(tid, req.prompt_token_ids, req.sampling, endpoint)
                prefill_task = asyncio.ensure_future(prefill.handle.prefill(order))
            detok = IncrementalDetokenizer(self.tokenizer, req.stop)
            out_ids: list[int] = []
            first_token = 0.0
            chunks = contextlib.aclosing(self._chunks(queue, prefill_task, prefill))
            async with chunks as stream:
                async for chunk in stream:
                    out_ids += chunk.token_ids
                    delta = detok.add(chunk.token_ids)
                    stopped = delta.stopped
                    text = delta.text
                    if not stopped and chunk.finish is not None:
                        text += detok.finish().text
                    if chunk.token_ids or text:
                        first_token = first_token or time.time()
                        yield pb.GenerateResponse(chunk=pb.TokenChunk(
                            token_ids=list(chunk.token_ids), text=text))
                    if stopped or chunk.finish is not None:
                        finished = chunk.finish is not None
                        outcome = await self._prefill_outcome(prefill_task)
                        yield final_response(
                            request_id, req, "stop" if stopped else chunk.finish, len(out_ids),
                            chunk.stamps, outcome, arrival, dispatched, first_token,
                            decode.record.worker_id,
                            prefill.record.worker_id if prefill else "")
                        return
        finally:
            self.stream.close_queue(tid)
            for worker in (decode, prefill):
                if worker is not None:
                    worker.in_flight.pop(tid, None)
            if not finished:
                await self._abort(tid, decode, prefill)
            async with self._changed:
                self._changed.notify_all()

    async def _dispatch(self, req: ValidRequest, tid: str, disagg: bool, queue):
        """Wait for slots, then reserve (or start a local prefill). Returns the decode worker,
        the prefill worker (None when local) and the KV endpoint."""
        if self._queued >= self.config.max_queue:
            raise overloaded(f"the router queue is full ({self.config.max_queue} requests "
                             "waiting for a worker)")
        self._queued += 1
        try:
            while True:
                decode_roles = ("decode",) if disagg else ("colocated", "decode")
                decodes = self._role(*decode_roles)
                if not decodes:
                    raise unavailable(f"no live {' or '.join(decode_roles)} worker")
                _check_fits(decodes, len(req.prompt_token_ids))
                prefill = None
                if disagg:
                    prefills = self._role("prefill")
                    if not prefills:
                        raise unavailable("no live prefill worker")
                    prefill = await self._pick_prefill(prefills, req.prompt_token_ids)
                decode = self._pick_decode(decodes, len(req.prompt_token_ids))
                if decode is not None and (prefill is not None or not disagg):
                    order = DecodeOrder(tid, req.prompt_token_ids, req.sampling,
                                        self.stream.endpoint, self.config.lease_s)
                    decode.in_flight[tid] = queue
                    try:
                        if disagg:
                            endpoint = await decode.handle.reserve(order)
                            prefill.in_flight[tid] = queue
                            return decode, prefill, endpoint
                        await decode.handle.generate(order)
                        return decode, None, ""
                    except NoRoom:
                        decode.in_flight.pop(tid, None)
                        decode.record = _without_room(decode.record)
                    except WorkerGone:
                        decode.in_flight.pop(tid, None)
                        self._drop(decode.record.worker_id)
                        continue
                    except BaseException:  # cancelled mid-call: the reservation may exist
                        decode.in_flight.pop(tid, None)
                        await self._abort(tid, decode, None)
                        raise
                async with self._changed:  # the router queue: until a slot or blocks free up
                    try:
                        await asyncio.wait_for(self._changed.wait(), self.config.refresh_s)
                    except TimeoutError:
                        pass
        finally:
            self._queued -= 1

    def _pick_decode(self, workers: list[_Worker], n: int) -> _Worker | None:
        loads = {w.record.worker_id: w for w in workers}
        limit = self.config.max_in_flight_per_worker
        if self.config.policy is Policy.ROUND_ROBIN:
            chosen = round_robin([w.load() for w in workers], next(self._turn), limit)
        else:
            chosen = choose_decode([w.load() for w in workers], n, limit)
        return loads[chosen.worker_id] if chosen else None

    async def _pick_prefill(self, workers: list[_Worker], tokens) -> _Worker | None:
        loads = {w.record.worker_id: w for w in workers}
        limit = self.config.max_in_flight_per_worker
        if self.config.policy is Policy.ROUND_ROBIN:
            chosen = round_robin([w.load() for w in workers], next(self._turn), limit)
        else:
            block_size = workers[0].record.block_size
            hits = await prefix_hits(self.redis, block_hashes(tokens, block_size))
            chosen = choose_prefill([w.load() for w in workers], len(tokens), hits, limit)
        return loads[chosen.worker_id] if chosen else None

    async def _chunks(self, queue: asyncio.Queue, prefill_task, prefill) -> AsyncIterator[
            StreamChunk]:
        """The request's stream chunks until the last one; raises UNAVAILABLE when the
        prefill fails or a worker dies, so the caller aborts the other side."""
        get = asyncio.ensure_future(queue.get())
        try:
            while True:
                waiting = {get}
                if prefill_task is not None and not prefill_task.done():
                    waiting.add(prefill_task)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if prefill_task in done:
                    outcome = await self._prefill_outcome(prefill_task)
                    if outcome.status is not PrefillStatus.DONE:
                        raise unavailable(f"prefill on {prefill.record.worker_id} failed: "
                                          f"{outcome.reason}")
                if get not in done:
                    continue
                item = get.result()
                get = asyncio.ensure_future(queue.get())
                if isinstance(item, _Gone):
                    raise unavailable(f"worker {item.worker_id} is gone")
                if item.finish in ("error", "abort"):
                    raise unavailable(f"decode worker {item.worker_id} ended the request: "
                                      f"{item.error or item.finish}")
                yield item
                if item.finish is not None:
                    return
        finally:
            get.cancel()

    @staticmethod
    async def _prefill_outcome(task: asyncio.Task | None) -> PrefillOutcome | None:
        if task is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(task), 10.0)
        except WorkerGone as e:
            raise unavailable(f"prefill worker is gone: {e}") from e
        except TimeoutError:
            return None  # the KV and the first token arrived; its report is late

    async def _abort(self, tid: str, decode: _Worker | None, prefill: _Worker | None) -> None:
        # Prefill first, so it stops sending before the decode side forgets the transfer.
        for worker in (prefill, decode):
            if worker is None:
                continue
            try:
                await worker.handle.abort(tid)
            except Exception as e:  # noqa: BLE001 - a dead worker has freed everything
                log.info("abort of %s on %s failed: %s", tid, worker.record.worker_id, e)

    def status(self) -> pb.ClusterStatus:
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w.record.worker_id):
            r = w.record
            used = 1 - r.free_blocks / r.total_blocks if r.total_blocks else 0.0
            workers.append(pb.WorkerStatus(
                worker_id=r.worker_id, role=r.role, node=r.node, kv_endpoint=r.kv_endpoint,
                total_blocks=r.total_blocks, free_blocks=r.free_blocks, running=r.running,
                waiting=r.waiting, queued_prefill_tokens=r.queued_prefill_tokens,
                in_flight=len(w.in_flight), last_heartbeat=r.heartbeat, kv_usage=used))
        return pb.ClusterStatus(workers=workers, router_id=self.config.router_id)


def _check_fits(workers: list[_Worker], num_prompt_tokens: int) -> None:
    """A prompt no worker could ever hold is refused now instead of waiting forever."""
    capacity = max(w.record.total_blocks * w.record.block_size for w in workers)
    if num_prompt_tokens + 1 > capacity:
        raise RequestError("INVALID_ARGUMENT", f"prompt: {num_prompt_tokens} tokens need more "
                                               f"KV than any worker holds ({capacity} tokens)")


def _without_room(record: WorkerRecord) -> WorkerRecord:
    """Until its next heartbeat, treat a worker that refused a reservation as full."""
    return WorkerRecord(**{**record.__dict__, "free_blocks": 0})
