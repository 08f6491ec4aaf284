"""The worker tests' stand-in for the router: reserve on a decode worker, submit the prefill
job, and collect the stream (bench.stream_collector), with none of the router's policies,
admission or recovery. Worker handles are worker objects or `deploy.local` proxies."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.bench.stream_collector import StreamCollector, Streamed
from pdserve.engine import NoFreeBlocksError
from pdserve.protocol import (
    DecodeOrder,
    FinishReason,
    PrefillOrder,
    PrefillOutcome,
    Reservation,
    SamplingParams,
)


@dataclass(frozen=True)
class Outcome:
    token_ids: list[int]
    finish: FinishReason
    error: str
    prefill: PrefillOutcome | None
    stream: Streamed


def reserve(collector: StreamCollector, decode, tid: str, prompt: Sequence[int],
            params: SamplingParams, lease_s: float = 30.0, wait_s: float = 60.0,
            deadline: float | None = None) -> Reservation:
    """Reserve on `decode`, waiting for room as the router's queue does."""
    order = DecodeOrder(tid, tuple(prompt), params, collector.endpoint, lease_s, deadline)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return decode.reserve(order)
        except NoFreeBlocksError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # polling for room, as the router's queue does


def submit(collector: StreamCollector, prefill, tid: str, prompt: Sequence[int],
           params: SamplingParams, reservation: Reservation,
           deadline: float | None = None) -> None:
    prefill.submit(PrefillOrder(tid, tuple(prompt), params, reservation.kv_endpoint,
                                collector.endpoint, deadline,
                                kv_start=reservation.num_cached_tokens))


def run_disaggregated(collector: StreamCollector, prefill, decode, tid: str,
                      prompt: Sequence[int], params: SamplingParams,
                      lease_s: float = 30.0) -> Outcome:
    """One request through `prefill` and `decode`, as the router runs it (DESIGN §2)."""
    submit(collector, prefill, tid, prompt, params,
           reserve(collector, decode, tid, prompt, params, lease_s))
    s = collector.wait_final(tid)
    return Outcome(s.token_ids, s.final.finish, s.final.error, collector.wait_outcome(tid), s)


def run_colocated(collector: StreamCollector, worker, tid: str, prompt: Sequence[int],
                  params: SamplingParams) -> Outcome:
    worker.generate(DecodeOrder(tid, tuple(prompt), params, collector.endpoint))
    s = collector.wait_final(tid)
    return Outcome(s.token_ids, s.final.finish, s.final.error, None, s)


def run_many(collector: StreamCollector, prefills: Sequence, decodes: Sequence,
             prompts: Sequence[Sequence[int]], params: SamplingParams,
             prefix: str) -> list[Outcome]:
    """All prompts at once, spread round-robin over the workers."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(run_disaggregated, collector, prefills[i % len(prefills)],
                               decodes[i % len(decodes)], f"{prefix}-{i}", p, params)
                   for i, p in enumerate(prompts)]
        return [f.result() for f in futures]
