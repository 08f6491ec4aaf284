"""Drives an Engine from its own thread while control calls arrive from any thread.

Life of a loop:
1. RUNNING  `EngineLoop(engine, handler)` starts the thread. Each turn it
            a. applies every queued control call, in arrival order (`call`, `post`);
            b. lets the handler poll what happens outside the engine (`handler.tick`:
               KV transfers, leases);
            c. if the engine has work: one `engine.step`, with the handler's per-layer KV
               hook for that batch (`handler.before_step`), then `handler.after_step` with
               the outputs; otherwise it sleeps until the next control call or for
               `handler.idle_wait()` seconds;
            d. publishes a load snapshot, which `load()` returns without waiting, with the
               prefill rate measured on the steps so far (worker.rate).
2. CLOSED   `close()` ends the loop after the turn in progress, then calls
            `handler.close()` on the loop thread. Calls still queued fail with
            RuntimeError, as do later ones.
   BROKEN   an exception from the engine or the handler ends the loop the same way; `load()`
            reports it in `error`. A broken engine must not pretend to serve. A request
            whose own computation fails (NaN logits, a failed sampling or forward) does not
            break it: the engine ends that request with an ERROR output, which the handler
            passes on like any other, and the loop goes on (Engine, Failures).

Thread-safety: only the loop thread touches the engine and the handler's state. `call` and
`post` just enqueue, so a control call never blocks the loop; `call` returns a Future the
loop completes (with the exception if the call raised).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from pdserve.engine import Engine, EngineStats, RequestOutput, ScheduledBatch
from pdserve.engine.model.llama import LayerKVHook
from pdserve.worker.rate import DecodeStepTime, PrefillRate, decoding, prefill_tokens

T = TypeVar("T")


@dataclass(frozen=True)
class LoadReport:
    """A worker's load as of its last loop turn (what a router reads to place requests)."""

    engine: EngineStats
    num_jobs: int  # requests the worker holds in any state, transfers included
    time: float  # time.time() of the snapshot
    error: str = ""  # why the loop stopped, when it broke
    prefill_tokens_per_s: float = 0.0  # measured on its steps (worker.rate); 0.0: none yet
    num_leases: int = 0  # jobs holding KV under a lease (LoopHandler.num_leases)
    decode_step_s: float = 0.0  # decode-only step time (worker.rate); 0.0: none yet
    chunk_tokens: int = 0  # the engine's token budget per step (its prefill chunk)
    # what prompt chunks add to its decoding steps, per step on average (worker.rate)
    prefill_stall_s: float = 0.0

    @property
    def is_idle(self) -> bool:
        e = self.engine
        return (self.num_jobs == 0 and e.num_running == 0 and e.num_waiting == 0
                and e.num_reserved == 0 and e.num_free_blocks == e.num_total_blocks)


class LoopHandler:
    """What a worker adds around the engine. Every method runs on the loop thread."""

    def before_step(self, batch: ScheduledBatch) -> LayerKVHook | None:
        """The batch about to run; may return a per-layer KV hook for it."""
        return None

    def after_step(self, outputs: list[RequestOutput]) -> None:
        """What the step produced."""

    def tick(self) -> None:
        """Poll the world outside the engine; runs every turn."""

    def idle_wait(self) -> float:
        """Seconds to sleep when the engine is idle (shorter while transfers are pending)."""
        return 0.1

    def num_jobs(self) -> int:
        return 0

    def num_leases(self) -> int:
        """Jobs whose KV is held under a lease (a reservation waiting for KV, a prefill's KV
        waiting for its ack or a re-send)."""
        return 0

    def close(self) -> None:
        """The loop is ending: release sockets and fail what is in flight."""


class EngineLoop:
    def __init__(self, engine: Engine, handler: LoopHandler, name: str = "engine-loop"):
        self.engine = engine
        self.handler = handler
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Future | None] | None] = (
            queue.SimpleQueue())
        self._stop = threading.Event()
        self._error = ""
        # prefix-cache events gathered on the loop thread, handed out without waiting
        self._prefix_lock = threading.Lock()
        self._prefix_events: tuple[set[int], set[int]] | None = None  # None: nobody asked
        self._rate = PrefillRate()
        self._decode_step = DecodeStepTime()
        self._step_decodes = 0  # sequences decoding in the step that runs
        self._step_prefill_tokens = 0
        self._report = self._snapshot()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn()` on the loop thread between steps; its result or exception in a Future."""
        future: Future[T] = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError(self._closed_reason()))
        else:
            self._calls.put((fn, future))
        return future

    def post(self, fn: Callable[[], object]) -> None:
        """Run `fn()` on the loop thread between steps; nobody waits for it."""
        if not self._stop.is_set():
            self._calls.put((fn, None))

    def load(self) -> LoadReport:
        return self._report

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        """Block hashes that entered and left the engine's prefix cache since the last call,
        as of the last turn. Never waits for a step (a heartbeat must not stall behind a long
        prefill); the first call starts the recording, whose first batch is every block
        cached then."""
        with self._prefix_lock:
            if self._prefix_events is None:
                self._prefix_events = (set(), set())
                return [], []
            entered, left = self._prefix_events
            self._prefix_events = (set(), set())
        return sorted(entered), sorted(left)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def closed_reason(self) -> str | None:
        """Why the loop no longer serves (closed, or broken by an error); None while it does."""
        return self._closed_reason() if self._stop.is_set() else None

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after the current turn; idempotent."""
        self._stop.set()
        self._calls.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- loop thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        except BaseException as e:  # noqa: BLE001 - any failure ends serving, visibly
            self._error = f"{type(e).__name__}: {e}"
        finally:
            self._stop.set()
            try:
                self.handler.close()
            finally:
                self._fail_queued()
                self._report = self._snapshot()

    def _turn(self) -> None:
        self._apply_calls(block_s=0.0)
        self.handler.tick()
        if self.engine.has_work():
            backlog = self._report.engine.num_queued_prefill_tokens > 0
            started = time.perf_counter()
            outputs = self.engine.step(self._before_step)
            seconds = time.perf_counter() - started
            self._rate.observe(self._step_prefill_tokens, seconds, backlog)
            self._decode_step.observe(self._step_prefill_tokens, self._step_decodes, seconds)
            self.handler.after_step(outputs)
        else:
            self._rate.flush()
            self._report = self._snapshot()
            self._apply_calls(block_s=self.handler.idle_wait())
            return
        self._report = self._snapshot()

    def _apply_calls(self, block_s: float) -> None:
        try:
            item = self._calls.get(timeout=block_s) if block_s > 0 else self._calls.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future is None:
                fn()
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    future.set_exception(e)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
        self._stop.set()  # None: close() was called

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1] is not None:
                item[1].set_exception(RuntimeError(self._closed_reason()))

    def _closed_reason(self) -> str:
        return f"engine loop stopped: {self._error}" if self._error else "engine loop closed"

    def _gather_prefix_events(self) -> None:
        with self._prefix_lock:
            tracking = self._prefix_events is not None
        if not tracking:
            return
        new_in, new_out = self.engine.drain_prefix_events()
        with self._prefix_lock:
            entered, left = self._prefix_events
            entered.difference_update(new_out)
            left.difference_update(new_in)
            entered.update(new_in)
            left.update(new_out)

    def _before_step(self, batch: ScheduledBatch):
        self._step_prefill_tokens = prefill_tokens(batch)
        self._step_decodes = decoding(batch)
        return self.handler.before_step(batch)

    def _snapshot(self) -> LoadReport:
        self._gather_prefix_events()
        return LoadReport(self.engine.stats(), self.handler.num_jobs(), time.time(),
                          self._error, self._rate.tokens_per_s, self.handler.num_leases(),
                          self._decode_step.seconds,
                          self.engine.config.scheduler.max_num_batched_tokens,
                          self._decode_step.stall_s)
