"""One simulated run: a deployment (how many workers of each role, their batch and chunk
settings, the router's) under a workload, on a cost profile; the results are the
RequestResults a measured run gives, summarized by the same `bench.metrics.summarize`.

Adaptive workers (`adaptive`) start in the roles deploy.spec gives them (one alone
colocated; more, half prefill rounded down, the rest decode) after the fixed pools; with
the router's `controller` settings (RouterConfig.controller, as `pdserve serve --adaptive`
sets them) the controller (bench.sim.controller) moves them, and the run keeps its moves.
The router's cost profile (RouterConfig.cost_profile) is what its predictions use; the
profile `simulate` is given is what the steps cost: the two may differ, as a router's
profile may be of another day.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.bench.metrics import RequestResult, Slo, summarize
from pdserve.bench.sim.controller import SimController, Switch
from pdserve.bench.sim.events import EventLoop
from pdserve.bench.sim.request import SimRequest
from pdserve.bench.sim.router import SimRouter
from pdserve.bench.sim.worker import SimWorker
from pdserve.deploy.spec import CPU_PREFILL_PACK_TOKENS
from pdserve.protocol import WorkerRole
from pdserve.protocol.cost_profile import CostProfile
from pdserve.router.config import RouterConfig


@dataclass(frozen=True)
class Deployment:
    """What `pdserve serve` would be started with (its flags of the same names)."""

    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    max_num_batched_tokens: int = 2048  # the chunk budget of a step
    max_num_seqs: int = 64  # the batch cap
    block_size: int = 16
    num_blocks: int | None = None  # None: the profile's KV capacity
    heartbeat_s: float = 0.5  # how often workers publish their load to the routers
    # workers per host, sharing its memory bus (the profile's contention applies among
    # them); None: a measured profile's usable cores (one worker per core, as deployed on
    # the machine it measured), else 1 (a GPU each)
    host_size: int | None = None
    router: RouterConfig = field(default_factory=RouterConfig)
    adaptive: int = 0  # workers whose role the controller sets (after the others)
    # a prefill step packs prompts up to this many tokens; None: as `pdserve serve` picks
    # for the profile's device (deploy.spec's CPU limit, none on a GPU)
    prefill_pack_tokens: int | None = None

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.colocated, self.adaptive) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.decode + self.colocated + self.adaptive == 0:
            raise ValueError("a deployment needs a decode or colocated worker")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.block_size < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and block_size must be >= 1")

    @property
    def workers(self) -> int:
        return self.prefill + self.decode + self.colocated + self.adaptive

    @property
    def name(self) -> str:
        parts = [f"{n}{tag}" for n, tag in ((self.prefill, "P"), (self.decode, "D"),
                                             (self.colocated, "C"), (self.adaptive, "A")) if n]
        return "".join(parts)

    def roles(self) -> list[tuple[WorkerRole, bool]]:
        """(first role, adaptive) of every worker, as deploy.spec orders and starts them."""
        fixed = ([WorkerRole.PREFILL] * self.prefill + [WorkerRole.DECODE] * self.decode
                 + [WorkerRole.COLOCATED] * self.colocated)
        if self.adaptive == 1:
            adaptive = [WorkerRole.COLOCATED]
        else:
            adaptive = [WorkerRole.PREFILL if i < self.adaptive // 2 else WorkerRole.DECODE
                        for i in range(self.adaptive)]
        return [(r, False) for r in fixed] + [(r, True) for r in adaptive]


@dataclass
class SimRun:
    results: list[RequestResult]
    duration_s: float
    events: int
    preemptions: int
    busy: dict[str, float]  # worker id -> busy share of the run
    # worker id -> what it still holds at the end (all zero: nothing leaked)
    final_state: dict[str, dict[str, int]] = field(default_factory=dict)
    switches: list[Switch] = field(default_factory=list)  # the controller's moves
    roles: dict[str, str] = field(default_factory=dict)  # worker id -> its role at the end

    def summary(self, slo: Slo | None, kv_bytes_per_token: int = 0) -> dict:
        return summarize(self.results, self.duration_s, slo,
                         kv_bytes_per_token=kv_bytes_per_token)


def _pack_tokens(deployment: Deployment, profile: CostProfile) -> int | None:
    if deployment.prefill_pack_tokens is not None:
        return deployment.prefill_pack_tokens
    on_gpu = profile.source == "roofline" or "gpu" in profile.machine
    return None if on_gpu else CPU_PREFILL_PACK_TOKENS


def simulate(deployment: Deployment, profile: CostProfile, prompt_lens: Sequence[int],
             output_lens: Sequence[int], arrivals: Sequence[float], *,
             sent_slo: Slo | None = None, keep_itl: bool = True,
             warm: bool = False) -> SimRun:
    """Run the requests (prompt length, output length, arrival time each) to the end.
    `sent_slo`: SLOs sent with every request (the router's admission then uses them);
    `keep_itl`: record every token's time (the ITL statistics need them; costs memory);
    `warm`: the workers start with their prefill rate and decode step time measured, as
    after warm-up requests (else admission admits everything until they have measured)."""
    if not len(prompt_lens) == len(output_lens) == len(arrivals):
        raise ValueError("prompt_lens, output_lens and arrivals must be the same length")
    loop = EventLoop()
    num_blocks = deployment.num_blocks or max(
        1, profile.kv_capacity_tokens // deployment.block_size)
    workers = []
    for i, (role, adaptive) in enumerate(deployment.roles()):
        w = SimWorker(f"{'adaptive' if adaptive else role.value}-{i}", role, loop, profile,
                      max_num_batched_tokens=deployment.max_num_batched_tokens,
                      max_num_seqs=deployment.max_num_seqs,
                      block_size=deployment.block_size, num_blocks=num_blocks,
                      keep_token_times=keep_itl, heartbeat_s=deployment.heartbeat_s,
                      prefill_pack_tokens=_pack_tokens(deployment, profile))
        w.adaptive = adaptive
        workers.append(w)
    host = deployment.host_size or (int(profile.machine.get("cores_usable", 1))
                                     if profile.source == "measured" else 1)
    for i in range(0, len(workers), host):
        for w in workers[i:i + host]:
            w.neighbours = [n for n in workers[i:i + host] if n is not w]
    if warm:
        for w in workers:
            w.warm_up()
    router = SimRouter(loop, deployment.router, workers, profile, sent_slo)
    for i, w in enumerate(workers):  # heartbeats spread over a period, as threads started apart
        w.heartbeat.start(deployment.heartbeat_s * i / len(workers), lambda: router.open > 0)
    controller = None
    if deployment.adaptive and deployment.router.controller is not None:
        controller = SimController(deployment.router.controller, loop, router, workers)
        controller.start(lambda: router.open > 0)
    requests = [SimRequest(i, p, o, a) for i, (p, o, a)
                in enumerate(zip(prompt_lens, output_lens, arrivals, strict=True))]
    if keep_itl:
        for r in requests:
            r.token_times = []
    router.arrive_all(requests)
    # the run makes millions of short-lived objects and no garbage cycles: the cycle
    # collector's passes over the ever larger heap of live ones would be pure cost
    collecting = gc.isenabled()
    gc.disable()
    try:
        loop.run()
        stream_s = profile.stream_s
        results = [r.result(stream_s) for r in requests]
    finally:
        if collecting:
            gc.enable()
    duration = max((r.t_end + stream_s for r in requests), default=0.0)
    return SimRun(results, duration, loop.processed, sum(w.preemptions for w in workers),
                  {w.worker_id: w.busy_s / duration if duration else 0.0 for w in workers},
                  {w.worker_id: holding(w) for w in workers},
                  controller.switches if controller else [],
                  {w.worker_id: w.role.value for w in workers})


def holding(w: SimWorker) -> dict[str, int]:
    """What a worker holds at the end of a run; all zero once every request has ended."""
    return {"used_blocks": w.used_blocks, "in_flight": w.in_flight,
            "batch": w.decoding.size, "context": w.decoding.context,
            "queued_tokens": w.queued_tokens, "waiting": len(w.waiting),
            "prefilling": len(w.prefilling), "sent_tokens": w.sent_tokens,
            "draining": int(not w.serving)}
