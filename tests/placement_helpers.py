"""A router with a synthetic cost profile and workers held in its view by hand (no
registry, no worker process): for placement, admission and dispatch tests."""

from __future__ import annotations

import time

from pdserve.protocol import (
    CostProfile,
    SamplingParams,
    StepModel,
    TransferModel,
    WorkerRecord,
    WorkerRole,
)
from pdserve.router.policy import Hint
from pdserve.router.router import Router, RouterConfig
from pdserve.router.validate import ValidRequest
from pdserve.router.view import LiveWorker

# 1 ms per token past the floor: a 1,000-token chunk is ~1 s
PROFILE = CostProfile("measured", {}, {"layers": 4}, 100, 100_000,
                      StepModel(0.0, 0.01, 1e-3, 0.0, 0.0, 0.0), TransferModel(0.01, 1e9))


def worker(wid: str, role: WorkerRole, queued: int = 0, running: int = 0) -> LiveWorker:
    record = WorkerRecord(wid, role, "n", "", 16, 1000, 1000, running, 0, queued, time.time(),
                          1.0, chunk_tokens=1000)
    return LiveWorker(record, handle=None)


def request(n: int, slo_ttft_ms: float | None = None, hint: Hint = Hint.AUTO,
            slo_tpot_ms: float | None = None) -> ValidRequest:
    return ValidRequest("", tuple(range(1, n + 1)), SamplingParams(max_tokens=4), hint,
                        slo_ttft_ms, slo_tpot_ms)


def router_of(*workers: LiveWorker, default_ttft_slo_s: float = 30.0) -> Router:
    router = Router(RouterConfig(default_ttft_slo_s=default_ttft_slo_s, cost_profile=PROFILE),
                    None, None, lambda record: None)
    router.view.workers = {w.worker_id: w for w in workers}
    return router
