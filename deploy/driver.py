"""A synchronous stand-in for the router over local workers, for benchmarks and tests: it
binds the token-stream endpoint, reserves on a decode worker, submits the prefill job and
collects the streamed tokens. It has none of the router's policies, admission or recovery.

Worker handles are the worker objects themselves or `deploy.local` proxies: both have the
same methods.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq
from pdserve.decode_worker import DecodeJob, StreamFinish, TokenBatch, TokenChunk
from pdserve.engine import NoFreeBlocksError, SamplingParams
from pdserve.prefill_worker import PrefillJob, PrefillResult


@dataclass
class Streamed:
    token_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # the worker's step time, per token
    arrivals: list[float] = field(default_factory=list)  # time.time() here, per token
    final: TokenChunk | None = None


class StreamCollector:
    """The router's PULL socket and a thread that files every chunk by transfer id."""

    def __init__(self) -> None:
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.streams: dict[str, Streamed] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def wait(self, transfer_id: str, timeout: float = 60.0) -> Streamed:
        """The job's stream once its final chunk arrived."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (s := self.streams.get(transfer_id)) is not None and s.final, timeout)
            if not ok:
                raise AssertionError(f"no final chunk for {transfer_id} in {timeout}s: "
                                     f"{self.streams.get(transfer_id)}")
            return self.streams[transfer_id]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._sock.close()

    def _run(self) -> None:
        while not self._closed:
            if not self._sock.poll(50):
                continue
            batch = TokenBatch.decode(self._sock.recv())
            now = time.time()
            with self._cond:
                for chunk in batch.chunks:
                    s = self.streams.setdefault(chunk.transfer_id, Streamed())
                    assert s.final is None, f"chunk after the final one for {chunk.transfer_id}"
                    s.token_ids += chunk.token_ids
                    s.times += [batch.time] * len(chunk.token_ids)
                    s.arrivals += [now] * len(chunk.token_ids)
                    if chunk.finish is not None:
                        s.final = chunk
                self._cond.notify_all()


@dataclass(frozen=True)
class Outcome:
    token_ids: list[int]
    finish: StreamFinish
    error: str
    prefill: PrefillResult | None
    stream: Streamed


def run_disaggregated(collector: StreamCollector, prefill, decode, transfer_id: str,
                      prompt: Sequence[int], params: SamplingParams,
                      lease_s: float = 30.0) -> Outcome:
    """One request through `prefill` and `decode`, as the router runs it (DESIGN §2)."""
    job = DecodeJob(transfer_id, tuple(prompt), params, collector.endpoint, lease_s)
    deadline = time.monotonic() + 60
    while True:  # a full decode worker: wait for room, as the router's queue does
        try:
            endpoint = decode.reserve(job)
            break
        except NoFreeBlocksError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    result = prefill.prefill(PrefillJob(transfer_id, tuple(prompt), params, endpoint))
    s = collector.wait(transfer_id)
    return Outcome(s.token_ids, s.final.finish, s.final.error, result, s)


def run_colocated(collector: StreamCollector, worker, transfer_id: str,
                  prompt: Sequence[int], params: SamplingParams) -> Outcome:
    worker.generate(DecodeJob(transfer_id, tuple(prompt), params, collector.endpoint))
    s = collector.wait(transfer_id)
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
