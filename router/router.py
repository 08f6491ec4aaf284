"""The request lifecycle (DESIGN §2) over the workers the Redis registry lists.

Life of a request:
1. ADMITTED    `generate` admits it or refuses it at once with RESOURCE_EXHAUSTED: when
               the router queue is full, when the prefill work queued ahead of it would
               delay its first token past its TTFT SLO, or when its prefill, where it
               would decode, would stall the requests decoding there past their TPOT SLO
               on every worker (router.door). An admitted request is never failed for
               waiting.
2. QUEUED      it waits until a worker of each role it needs has a free slot (at most
               `max_in_flight_per_worker` requests per worker from this router) and, for
               decode, the blocks, first come, first served (router.queue). No live
               worker of a needed role: UNAVAILABLE.
3. DISPATCHED  the router opens the request's stream queue, then either reserves on a
               decode worker and submits the prefill job naming its KV endpoint and the
               prompt tokens the decode worker's prefix cache holds, which are not sent
               (disaggregated; protocol.orders, Delta transfers), or has the
               decode/colocated worker prefill locally. No call stays open: the prefill
               worker reports its outcome on the stream. A worker draining for a role
               switch refuses (NotServing): the request waits for another
               (router.dispatch).
4. STREAMING   chunks from the decode worker are detokenized incrementally and yielded.
               The first chunk means the decode worker holds the KV: the prefill job is
               over (its slot is given back, its late outcome or death no longer matters).
               A stop string ends the request here (only the decode job is aborted).
5. FINISHED    the last chunk (stop, length) gives the final message with usage and
               timing; it never waits for the prefill worker.
   RETRIED     a worker failed it: the prefill failed before the hand-off, the KV never
               arrived, the decode job ended in an error, or a worker died (the handle
               raised WorkerGone, or its registry entry expired). What the attempt held
               is aborted and the request goes back to 2, at the head of its line, under
               a new transfer id, preferring other workers: whole, if no token streamed
               yet (at most `max_attempts` dispatches), else as a migration (prompt +
               tokens so far, the rest of `max_tokens`; at most `migration_limit`), the
               stream going on. When the decode side failed before the hand-off, the
               prefill job is not aborted: it holds the KV (HELD), and the next dispatch
               reserves on another decode worker and has the same prefill worker re-send
               it there (protocol.orders, Re-sends) instead of computing it again.
   FAILED      past those bounds, or no live worker of a needed role: UNAVAILABLE.
   CANCELLED   the client went away or its deadline passed: the caller cancels the task.
               The orders carry the deadline too, so each worker drops the job by itself
               when it passes (before its prefill runs, if it has not), whether or not the
               router's abort reaches it.
On every exit of an attempt but FINISHED the router aborts its job, concurrently on both
workers (on the decode worker only once the hand-off happened), so every block is freed
on both sides; the slots are given back in all cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from pdserve.protocol import (
    FinishReason,
    IncrementalDetokenizer,
    TokenChunk,
)
from pdserve.router import telemetry
from pdserve.router.chunks import token_chunks
from pdserve.router.config import RouterConfig
from pdserve.router.controller.loop import controller_for
from pdserve.router.dispatch import Dispatcher, leave
from pdserve.router.door import Door
from pdserve.router.errors import RequestError, unavailable
from pdserve.router.final import Retries, final_response
from pdserve.router.intake import Intake
from pdserve.router.interference import decoding
from pdserve.router.ledger import PrefillLedger
from pdserve.router.observe import Dispatch, RequestObserver, RequestOutcome, RequestRecord, notify
from pdserve.router.placement import Route
from pdserve.router.predict import Predictor
from pdserve.router.queue import RouterQueue
from pdserve.router.retry import Attempt, Held, continuation
from pdserve.router.stream import StreamReader
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.router.tracecontext import TraceContext
from pdserve.router.validate import ValidRequest
from pdserve.router.view import ClusterView, HandleFactory
from pdserve.rpc import pdserve_pb2 as pb

log = logging.getLogger(__name__)
_OUTCOMES = {"RESOURCE_EXHAUSTED": RequestOutcome.REFUSED,
             "INVALID_ARGUMENT": RequestOutcome.INVALID}


class Router:
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, redis,
                 connect: HandleFactory):
        self.config = config
        self.tokenizer = tokenizer
        self.redis = redis
        self.view = ClusterView(redis, connect)
        self.stream = StreamReader(config.stream_host, config.curve)
        self.ledger = PrefillLedger()
        predictor = Predictor(config.cost_profile) if config.cost_profile else None
        self.queue = RouterQueue(config, self.view, redis, self.ledger, predictor)
        self.door = Door(config, self.view, self.queue, self.ledger, predictor)
        self.dispatcher = Dispatcher(config, self.view, self.queue, self.ledger, self.stream)
        # told of each request's end (observe): the request log, the tracer (telemetry)
        self.observers: list[RequestObserver] = telemetry.default_observers(
            config.otlp_endpoint, config.router_id)
        # its predictions follow what the requests measure (told at each first token)
        self.calibration = predictor.calibration if predictor is not None else None
        # validates requests for every front end (gRPC, HTTP): one bound on their work
        self.intake = Intake(tokenizer, config.input_limits)
        self._refresher: asyncio.Task | None = None
        self.controller = controller_for(config, redis, self.view, self.queue, self.observers)

    async def start(self) -> None:
        self.stream.start()
        await self.view.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        if self.controller is not None:
            self.controller.start()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.controller is not None:
            await self.controller.close()
        await self.stream.close()
        telemetry.close(self.observers)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.view.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving on the last known view
                log.error("registry refresh failed: %s", e)

    # -- a request ---------------------------------------------------------------------------

    async def generate(self, req: ValidRequest, deadline: float | None = None,
                       trace: TraceContext | None = None
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """The request's chunks, then its final message. `deadline` (time.time(), None for
        none) is the client's: it goes into the orders, so workers drop the job by itself.
        `trace`: its place in the client's trace (router.tracecontext; None: a trace of
        its own), for the observers. A worker that fails it costs a dispatch or a
        migration (the module's RETRIED), counted in the final message (`attempts`,
        `migrations`, `timing.retry_ms`)."""
        arrival = time.time()
        request_id = req.request_id or f"req-{uuid.uuid4().hex[:12]}"
        token_times: list[tuple[float, int]] = []
        ended: list[pb.FinalResponse] = []
        dispatches: list[Dispatch] = []
        outcome, code, error, short_of = RequestOutcome.CANCELLED, "CANCELLED", "", None
        try:
            async for response in self._generate(req, deadline, request_id, arrival,
                                                 dispatches):
                if response.HasField("chunk") and response.chunk.token_ids:
                    token_times.append((time.time(), len(response.chunk.token_ids)))
                elif response.HasField("final"):
                    ended.append(response.final)
                    outcome, code = RequestOutcome.FINISHED, ""
                yield response
        except RequestError as e:
            outcome, code, error = _OUTCOMES.get(e.code, RequestOutcome.FAILED), e.code, str(e)
            short_of = e.short_of
            raise
        except ValueError as e:  # a worker refused the job
            outcome, code, error = RequestOutcome.INVALID, "INVALID_ARGUMENT", str(e)
            raise
        except Exception as e:
            outcome, code, error = RequestOutcome.FAILED, "INTERNAL", str(e)
            raise
        finally:
            notify(self.observers, RequestRecord(
                request_id, outcome, arrival, time.time(), len(req.prompt_token_ids),
                sum(n for _, n in token_times), tuple(token_times),
                ended[0] if ended else None, code, error, trace or TraceContext.start(),
                tuple(dispatches), req.slo_ttft_ms, req.slo_tpot_ms, short_of))

    async def _generate(self, req: ValidRequest, deadline: float | None, request_id: str,
                        arrival: float, dispatches: list[Dispatch]
                        ) -> AsyncIterator[pb.GenerateResponse]:
        route, unfit = await self.door.route(req, arrival, request_id)
        detok = IncrementalDetokenizer(self.tokenizer.decode, req.sampling.stop)
        out_ids: list[int] = []
        first_token = 0.0
        attempts = migrations = 0
        retry_s = 0.0
        # workers that failed this request, or where its prefill would stall others past
        # their TPOT SLO: passed over while others remain
        avoid: set[str] = unfit
        held: Held | None = None  # the last attempt's prefill job, keeping its KV
        resends: list[Held] = []  # the attempts that re-sent a held KV
        while True:
            attempts += 1
            started = time.time()
            run = self._attempt(request_id, continuation(req, out_ids), deadline, avoid,
                                held, resends, dispatches, route, retry=attempts > 1)
            held = None  # the attempt re-sends it or aborts it
            try:
                async with contextlib.aclosing(run) as chunks:
                    async for chunk, attempt in chunks:
                        out_ids += chunk.token_ids
                        delta = detok.add(chunk.token_ids)
                        text = delta.text
                        if not delta.stopped and chunk.finish is not None:
                            text += detok.finish().text
                        if chunk.token_ids or text:
                            if not first_token:
                                first_token = time.time()
                                self._first_token(attempt, attempts, route,
                                                  first_token - arrival)
                            yield pb.GenerateResponse(chunk=pb.TokenChunk(
                                token_ids=list(chunk.token_ids), text=text))
                        if delta.stopped or chunk.finish is not None:
                            finish = FinishReason.STOP if delta.stopped else chunk.finish
                            yield final_response(
                                request_id, req, finish, len(out_ids), attempt.worker,
                                arrival, attempt.dispatched, first_token,
                                attempt.decode_id, attempt.prefill_id,
                                Retries(attempts, migrations, retry_s, len(resends)),
                                (route.predicted_ttft_s, route.predicted_tpot_s))
                            return
            except RequestError as e:
                if not e.retryable:
                    raise
                if (out_ids and migrations >= self.config.migration_limit
                        or not out_ids and attempts >= self.config.max_attempts):
                    await self.dispatcher.drop_held(e.held)
                    done = (f"after {migrations} migrations" if out_ids
                            else f"after {attempts} attempts")
                    raise unavailable(f"{e} ({done})") from e
                held = e.held
                migrations += bool(out_ids)
                retry_s += time.time() - started
                avoid.update(e.worker_ids)
                log.warning("request %s: %s; %s", request_id, e,
                            "migrating" if out_ids else "dispatching again")

    def _first_token(self, attempt: Attempt, attempts: int, route: Route,
                     ttft_s: float) -> None:
        """The calibration learns a TTFT as it comes, on a request's first dispatch."""
        if self.calibration is not None and attempts == 1:
            self.calibration.first_token(attempt.prefill_id, attempt.decode_id,
                                         route.predicted_ttft_s, ttft_s)

    async def _attempt(self, request_id: str, req: ValidRequest, deadline: float | None,
                       avoid: set[str], held: Held | None, resends: list[Held],
                       dispatches: list[Dispatch], route: Route,
                       retry: bool) -> AsyncIterator[tuple[TokenChunk, Attempt]]:
        """One dispatch of the request under a fresh transfer id: its token chunks, each with
        what the final message needs of this attempt. Whatever way it ends short of the
        decode job's own last chunk, both workers' jobs are aborted (blocks freed) and the
        slots are given back; but a prefill job left holding its KV after the decode side
        failed (the RequestError's `held`) is kept for the next attempt to re-send. `route`:
        admission's decision (router.placement). `held`
        (the last attempt's) is re-sent or aborted by this one; a re-send goes on
        `resends`. How it went is appended to `dispatches` when it ends."""
        # one per attempt, router-owned; 128 random bits, so no one can guess a live one
        tid = f"{request_id}/{secrets.token_hex(16)}"
        queue = self.stream.open(tid)
        decode = prefill = None
        attempt: Attempt | None = None
        started, error = time.time(), ""
        finished = False  # the decode job ended by itself: nothing left to abort
        keep_prefill = False  # the prefill job holds the KV for the next attempt
        try:
            decode, prefill, dispatched = await self.dispatcher.dispatch(
                req, tid, self.door.disaggregates(req, avoid, route.disaggregated), queue,
                deadline, avoid, held, resends, route, retry)
            self.door.interference.joined(
                decode.worker_id, tid,
                self.door.stall_s(decode, len(req.prompt_token_ids)) if prefill is None
                else 0.0,
                decoding(req.slo_tpot_ms, req.sampling.max_tokens))
            if prefill is not None and route.deadline is not None and route.slo is not None:
                since = route.deadline - route.slo.ttft_s
                self.door.incoming.expect(decode.worker_id, tid, since,
                                          since + route.predicted_ttft_s, route.deadline)
            attempt = Attempt(dispatched, decode.worker_id,
                               prefill.worker_id if prefill else "", TokenChunk(tid, ()))
            chunks = token_chunks(queue, decode, prefill, tid)
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    self.ledger.ended(tid)
                    if prefill is not None:  # the decode worker holds the KV: P is done
                        self.door.incoming.arrived(decode.worker_id, tid)
                        prefill.in_flight.pop(tid, None)
                        prefill = None
                        await self.view.notify()
                    if chunk.stamps is not None:
                        attempt.worker = chunk
                    finished = chunk.finish is not None
                    yield chunk, attempt
        except RequestError as e:
            keep_prefill = e.held is not None
            error = f"{e.code}: {e}"
            raise
        except ValueError as e:  # a worker refused the job
            error = f"INVALID_ARGUMENT: {e}"
            raise
        finally:
            dispatches.append(Dispatch(
                tid, started, attempt.dispatched if attempt else 0.0, time.time(),
                attempt.decode_id if attempt else "", attempt.prefill_id if attempt else "",
                attempt.worker.stamps if attempt else None, error))
            self.ledger.ended(tid)
            if decode is not None:
                self.door.interference.left(decode.worker_id, tid)
                self.door.incoming.arrived(decode.worker_id, tid)
            self.stream.close_queue(tid)
            leave(tid, decode, prefill)
            if not finished:
                # shielded: a cancelled request still frees what it holds on both workers
                await asyncio.shield(self.dispatcher.abort(tid, decode,
                                                 None if keep_prefill else prefill))
            if decode is not None:
                self.door.slots.released(self.queue.queued > 0)
            await self.view.notify()

    def status(self) -> pb.ClusterStatus:
        status = self.view.status(self.config.router_id)
        return self.controller.describe(status) if self.controller else status
