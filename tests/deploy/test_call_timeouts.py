"""Call timeouts of the router's handles (deploy.handles, Timeouts): a worker that does not
answer makes each call raise WorkerGone within the timeout, holds at most its own pool's
threads (never asyncio's default executor), gets its abort once it answers again, and does
not get an order that was still waiting for a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.deploy.call_pool import CallPool
from pdserve.deploy.handles import ThreadCalls, WorkerHandle
from pdserve.protocol import DecodeOrder, SamplingParams
from pdserve.router.handles import WorkerGone


def order(tid: str) -> DecodeOrder:
    return DecodeOrder(tid, (1, 2, 3), SamplingParams(max_tokens=2), "tcp://127.0.0.1:1")


class Hung:
    """A worker whose calls block until `resume` is set (a stopped process's proxy), then
    are applied; `applied` lists (method, transfer id) in the order they ran."""

    def __init__(self):
        self.resume = threading.Event()
        self.applied: list[tuple[str, str]] = []

    def _block(self, method: str, tid: str):
        self.resume.wait(60)
        self.applied.append((method, tid))

    def reserve(self, order):
        self._block("reserve", order.transfer_id)
        return "tcp://127.0.0.1:2"

    def generate(self, order):
        self._block("generate", order.transfer_id)

    def abort(self, tid):
        self._block("abort", tid)


def test_a_hung_worker_is_gone_within_the_timeout_and_gets_its_aborts_when_it_resumes():
    hung = Hung()
    handle = WorkerHandle(hung, "decode-0", ThreadCalls(timeout_s=0.5, threads=2))

    async def scenario():
        started = time.monotonic()
        # more calls than the pool has threads: the last ones wait for one and time out too
        results = await asyncio.gather(
            handle.generate(order("g1")), handle.reserve(order("r1")),
            handle.generate(order("g2")), handle.abort("a1"), return_exceptions=True)
        elapsed = time.monotonic() - started
        return results, elapsed

    results, elapsed = asyncio.run(scenario())
    assert elapsed < 10, elapsed  # 0.5 s each, at once; a loaded machine gets a margin
    assert [type(r) for r in results[:3]] == [WorkerGone] * 3, results
    assert "decode-0" in str(results[0]) and "0.5" in str(results[0])
    assert results[3] is None  # abort never raises
    hung.resume.set()
    # g1 and r1 were sent (a stopped worker applies them when it runs again); g2 was still
    # waiting for a thread: withdrawn; the abort waited too, and is delivered all the same
    deadline = time.monotonic() + 30
    while len(hung.applied) < 3:
        assert time.monotonic() < deadline, hung.applied
        time.sleep(0.01)
    assert sorted(hung.applied) == [("abort", "a1"), ("generate", "g1"), ("reserve", "r1")]
    # calls run in arrival order: once a later one ran, g2 would have too, had it not been
    # withdrawn
    asyncio.run(handle.generate(order("g3")))
    assert ("generate", "g2") not in hung.applied, hung.applied


def test_a_hung_worker_does_not_hold_the_default_executor_nor_other_workers_calls():
    hung, healthy = Hung(), Hung()
    healthy.resume.set()
    stuck = WorkerHandle(hung, "decode-0", ThreadCalls(timeout_s=30, threads=2))
    ok = WorkerHandle(healthy, "decode-1", ThreadCalls(timeout_s=30, threads=2))

    async def scenario():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        waiting = [asyncio.ensure_future(stuck.generate(order(f"s{i}"))) for i in range(8)]
        await asyncio.sleep(0)
        # the default executor's single thread and the other worker are both free
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 10) == 42
        assert await asyncio.wait_for(ok.reserve(order("h1")), 10) == "tcp://127.0.0.1:2"
        hung.resume.set()
        await asyncio.wait_for(asyncio.gather(*waiting), 30)

    asyncio.run(scenario())
    assert len([a for a in hung.applied if a[0] == "generate"]) == 8


def _busy_then_idle(pool: CallPool, calls: int, threads: int) -> None:
    """`calls` calls that block until released: the pool grows to `threads`; then all end."""
    gate = threading.Event()
    futures = [pool.submit(gate.wait, 30) for _ in range(calls)]
    assert pool.num_threads == threads
    gate.set()
    assert all(f.result(30) for f in futures)


def _wait_for_threads(pool: CallPool, left: int) -> None:
    """Until the pool's idle threads have gone down to `left` (bounded)."""
    deadline = time.monotonic() + 30
    while pool.num_threads > left:
        assert time.monotonic() < deadline, pool.num_threads
        time.sleep(0.05)


def test_the_pool_bounds_its_threads_and_lets_idle_ones_go():
    pool = CallPool("t", size=3, idle_s=0.2, keep=0)
    _busy_then_idle(pool, calls=10, threads=3)
    _wait_for_threads(pool, 0)
    assert pool.submit(lambda: 7).result(30) == 7  # a new thread serves again


def test_the_pool_keeps_its_last_thread_and_its_connection():
    """The thread a warm-up call made (and the worker connection it opened) still serves
    the first call after the pool has been idle longer than `idle_s`."""
    pool = CallPool("t", size=3, idle_s=0.2, keep=1)
    _busy_then_idle(pool, calls=3, threads=3)
    _wait_for_threads(pool, 1)
    kept = pool.submit(threading.get_ident).result(30)
    time.sleep(0.5)  # idle past idle_s: the kept thread stays
    assert pool.num_threads == 1 and pool.submit(threading.get_ident).result(30) == kept
    with pytest.raises(ValueError, match="keep"):
        CallPool("t", size=2, keep=3)


def test_a_warm_up_call_opens_the_thread_the_first_request_then_uses():
    """ThreadCalls.warm runs its call on a pool thread without waiting; the first real call
    finds that thread idle and runs there (a `deploy.local` proxy's connection is per
    thread). A warm-up that raises leaves the handle working."""
    calls = ThreadCalls(timeout_s=10, name="w")
    warmed = threading.Event()
    seen = []

    def load():
        seen.append(threading.get_ident())
        warmed.set()
        raise ConnectionError("the worker went away meanwhile")

    calls.warm(load)
    assert warmed.wait(30)
    deadline = time.monotonic() + 30
    while calls.pool.num_idle < 1:  # back from the warm-up call
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert calls.pool.num_threads == 1
    first = asyncio.run(calls(lambda _: threading.get_ident(), None))
    assert first == seen[0]


@pytest.mark.parametrize("timeout_s", [0, -1])
def test_the_timeout_must_be_positive(timeout_s):
    with pytest.raises(ValueError, match="timeout_s"):
        ThreadCalls(timeout_s=timeout_s)
