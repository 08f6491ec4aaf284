"""The router's worker handles over worker objects: in this process, or `deploy.local`
proxies to child processes (both have the same methods). Calls run in threads
(`ThreadCalls`) or as Ray actor calls (`deploy.ray_actors.RayCalls`); the router's orders
become the workers' jobs here, the one place that knows both.
"""

from __future__ import annotations

import asyncio

from pdserve.decode_worker import DecodeJob
from pdserve.engine import NoFreeBlocksError, SamplingParams
from pdserve.prefill_worker import PrefillJob, PrefillResult, PrefillState
from pdserve.router.handles import NoRoom, WorkerGone
from pdserve.router.jobs import DecodeOrder, PrefillOrder, PrefillOutcome, PrefillStatus, Sampling


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


class ThreadCalls:
    """Calls a worker object's method in a thread (the object, or a `deploy.local` proxy)."""

    # what a dead process, a closed manager connection or a stopped loop raise
    gone: tuple[type[BaseException], ...] = (ConnectionError, EOFError, OSError, RuntimeError)

    async def __call__(self, method, arg):
        return await asyncio.to_thread(method, arg)


class DecodeHandle:
    """The router's decode-side handle over `target` (a worker, a proxy or a Ray actor),
    whose methods `calls` invokes; worker errors become the router's (router.handles)."""

    def __init__(self, target, worker_id: str, calls=None):
        self.target = target
        self.worker_id = worker_id
        self._calls = calls or ThreadCalls()

    async def reserve(self, order: DecodeOrder) -> str:
        return await _call(self, self.target.reserve, decode_job(order))

    async def generate(self, order: DecodeOrder) -> None:
        await _call(self, self.target.generate, decode_job(order))

    async def abort(self, transfer_id: str) -> None:
        await _abort(self, transfer_id)


class PrefillHandle:
    def __init__(self, target, worker_id: str, calls=None):
        self.target = target
        self.worker_id = worker_id
        self._calls = calls or ThreadCalls()

    async def prefill(self, order: PrefillOrder) -> PrefillOutcome:
        return to_outcome(await _call(self, self.target.prefill, prefill_job(order)))

    async def abort(self, transfer_id: str) -> None:
        await _abort(self, transfer_id)


async def _call(handle, method, arg):
    try:
        return await handle._calls(method, arg)
    except NoFreeBlocksError as e:  # before `gone`: it is a RuntimeError
        raise NoRoom(str(e)) from e
    except ValueError:
        raise
    except handle._calls.gone as e:
        raise WorkerGone(f"{handle.worker_id}: {e!r}") from e


async def _abort(handle, transfer_id: str) -> None:
    try:
        await _call(handle, handle.target.abort, transfer_id)
    except WorkerGone:
        pass  # a dead worker holds nothing
