"""A simulated request: what the router and the workers of the simulator record of it, and
the RequestResult (bench.metrics) it becomes, so a simulated run is summarized by the same
code as a measured one.

Life: ARRIVED -> (router's intake) REFUSED, or QUEUED -> DISPATCHED -> PREFILLING (on a
prefill worker, or locally) -> [KV transfer] -> DECODING -> FINISHED. A preempted request
goes back to prefilling its prompt and the tokens it had, on the same worker.
"""

from __future__ import annotations

import enum

from pdserve.bench.metrics import RequestResult


class State(enum.Enum):
    ARRIVED = "arrived"
    QUEUED = "queued"
    PREFILLING = "prefilling"  # queued or computing on a worker
    TRANSFERRING = "transferring"  # KV on its way to the decode worker
    DECODING = "decoding"
    FINISHED = "finished"
    REFUSED = "refused"
    FAILED = "failed"


class SimRequest:
    __slots__ = ("idx", "prompt_len", "output_len", "arrival", "disagg", "state",
                 "prefill", "decode", "target", "computed", "blocks", "held", "generated", "epoch",
                 "join_step", "finish_step", "residue", "admitted", "t_intake", "t_dispatch",
                 "t_prefill_start", "t_prefill_end", "t_kv", "t_first", "t_end", "token_times",
                 "error", "short_of")

    def __init__(self, idx: int, prompt_len: int, output_len: int, arrival: float):
        self.idx, self.prompt_len, self.output_len = idx, prompt_len, output_len
        self.arrival = arrival
        self.disagg = False
        self.state = State.ARRIVED
        self.prefill = None  # the SimWorker that prefills it (disaggregated)
        self.decode = None  # the SimWorker that decodes it
        self.target = prompt_len  # tokens to prefill (prompt, plus output after preemption)
        self.computed = 0
        self.blocks = 0  # blocks it holds on the worker that decodes it
        self.held = 0  # blocks it holds on its prefill worker (disaggregated)
        self.generated = 0  # output tokens so far
        self.epoch = 0  # bumped when it leaves a decode batch: stale heap entries skip it
        self.join_step = 0  # the worker's step count when it joined the decode batch
        self.finish_step = 0  # the step after which it has all its tokens
        self.residue = 0  # which steps start a new block for it (SimWorker._join)
        self.admitted = 0  # when it entered the running set (a worker-wide sequence)
        self.t_intake = self.t_dispatch = self.t_prefill_start = self.t_prefill_end = 0.0
        self.t_kv = self.t_first = self.t_end = 0.0
        self.token_times: list[float] | None = None  # every token's time, when ITL is kept
        self.error = ""
        self.short_of = None  # a refusal's router.observe.Shortage

    def result(self, stream_s: float) -> RequestResult:
        n = self.prompt_len
        if self.state is State.REFUSED:
            return RequestResult(n, error=self.error, latency=self.t_end - self.arrival,
                                 refused=True, code="RESOURCE_EXHAUSTED")
        if self.state is not State.FINISHED:
            return RequestResult(n, error=self.error or f"ended {self.state.value}",
                                 latency=self.t_end - self.arrival, code="INVALID_ARGUMENT")
        ttft = self.t_first + stream_s - self.arrival
        times = self.token_times or []
        stages = {"router_queue_ms": (self.t_dispatch - self.t_intake) * 1e3,
                  "prefill_queue_ms": (self.t_prefill_start - self.t_dispatch) * 1e3,
                  "prefill_compute_ms": (self.t_prefill_end - self.t_prefill_start) * 1e3,
                  "kv_transfer_ms": ((self.t_kv - self.t_prefill_end) * 1e3
                                     if self.disagg else 0.0),
                  "decode_queue_ms": (self.t_first - (self.t_kv if self.disagg
                                                      else self.t_prefill_end)) * 1e3,
                  "decode_ms": (self.t_end - self.t_first) * 1e3}
        return RequestResult(n, success=True, ttft=ttft,
                             itl=[b - a for a, b in zip(times, times[1:], strict=False)]
                             if times else [],
                             latency=self.t_end + stream_s - self.arrival,
                             output_len=self.output_len, stages=stages,
                             disaggregated=self.disagg,
                             kv_window_s=(self.t_kv - self.t_prefill_start) if self.disagg
                             else 0.0)
