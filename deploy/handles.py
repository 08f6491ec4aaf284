"""The router's worker handles over worker objects: in this process, or `deploy.local`
proxies to child processes (both have the same methods). Calls run in threads
(`asyncio.to_thread`); the router's orders become the workers' jobs here, the one place
that knows both.
"""

from __future__ import annotations

import asyncio

from decode_worker import DecodeJob
from engine import NoFreeBlocksError, SamplingParams
from prefill_worker import PrefillJob, PrefillResult, PrefillState
from router.handles import NoRoom, WorkerGone
from router.jobs import DecodeOrder, PrefillOrder, PrefillOutcome, PrefillStatus, Sampling

# what a dead process, a closed manager connection or a stopped loop raise
_GONE = (ConnectionError, EOFError, BrokenPipeError, OSError, RuntimeError)


def sampling_params(s: Sampling) -> SamplingParams:
    return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, seed=s.seed, stop_token_ids=s.stop_token_ids,
                          ignore_eos=s.ignore_eos)


def decode_job(order: DecodeOrder) -> DecodeJob:
    return DecodeJob(order.transfer_id, order.prompt_token_ids, sampling_params(order.sampling),
                     order.stream_endpoint, order.lease_s)


def prefill_job(order: PrefillOrder) -> PrefillJob:
    return PrefillJob(order.transfer_id, order.prompt_token_ids,
                      sampling_params(order.sampling), order.kv_endpoint)


_STATUS = {PrefillState.DONE: PrefillStatus.DONE, PrefillState.FAILED: PrefillStatus.FAILED,
           PrefillState.ABORTED: PrefillStatus.ABORTED}


def to_outcome(result: PrefillResult) -> PrefillOutcome:
    return PrefillOutcome(_STATUS[result.state], result.first_token_id, result.reason,
                          result.num_cached_tokens, result.stamps.prefill_start,
                          result.stamps.prefill_end)


class ThreadDecodeHandle:
    def __init__(self, worker, worker_id: str):
        self.worker = worker
        self.worker_id = worker_id

    async def reserve(self, order: DecodeOrder) -> str:
        try:
            return await asyncio.to_thread(self.worker.reserve, decode_job(order))
        except NoFreeBlocksError as e:
            raise NoRoom(str(e)) from e
        except ValueError:
            raise
        except _GONE as e:
            raise WorkerGone(f"{self.worker_id}: {e!r}") from e

    async def generate(self, order: DecodeOrder) -> None:
        try:
            await asyncio.to_thread(self.worker.generate, decode_job(order))
        except ValueError:
            raise
        except _GONE as e:
            raise WorkerGone(f"{self.worker_id}: {e!r}") from e

    async def abort(self, transfer_id: str) -> None:
        try:
            await asyncio.to_thread(self.worker.abort, transfer_id)
        except _GONE:
            pass  # a dead worker holds nothing


class ThreadPrefillHandle:
    def __init__(self, worker, worker_id: str):
        self.worker = worker
        self.worker_id = worker_id

    async def prefill(self, order: PrefillOrder) -> PrefillOutcome:
        try:
            result = await asyncio.to_thread(self.worker.prefill, prefill_job(order))
        except ValueError:
            raise
        except _GONE as e:
            raise WorkerGone(f"{self.worker_id}: {e!r}") from e
        return to_outcome(result)

    async def abort(self, transfer_id: str) -> None:
        try:
            await asyncio.to_thread(self.worker.abort, transfer_id)
        except _GONE:
            pass
