"""The controller's rule: from one snapshot of the cluster to the role each adaptive worker
should have. Pure: no I/O, no clock (the snapshot carries `now`), so it is tested on
synthetic snapshots and the simulator could run it as is.

The rule:
1. Pressures, each 1.0 at the edge of what the side can take, judged by the SLOs the
   requests ask for (the mean over the window; the config's targets while none is seen):
   - prefill: the larger of the wait the queued prompt tokens (on the serving workers
     that take prompts: prefill and colocated ones, or the decode workers when there is
     none, since the router then has them prefill every prompt locally; and in the
     routers' queues) mean at the measured prefill rate, over the TTFT SLO (else
     `ttft_target_s`); the share of SLO requests that missed their TTFT, but for those
     the decode side's (below), over `miss_budget`; the share of requests refused at the
     door for prompt work (the work queued ahead, a local prefill's stall of the decoding
     requests, or a TPOT made mostly of the worker's own prompt chunks), over
     `miss_budget`; the prompt chunks' part of the TPOT misses (below); and how busy
     prompts kept those workers over the window (the prompt tokens computed for the
     requests that ended in it, at the measured prefill rate, over `window_s`): a lone
     prefill worker busy three quarters of the time reads no queue between two prompts,
     and moving it to decode would hand that work to the decoding workers' batches.
   - decode: the larger of the decode workers' mean fill (each one's measured decode step
     over the TPOT SLO, else its running batch over `batch_cap`; the KV share in use
     when higher; 1.0 when requests wait in its engine); the share that missed their
     TPOT, and the share that missed their TTFT while waiting mostly for the decode side
     (the KV's transfer and decode admission; router.controller.signals), each over
     `miss_budget`; and the share refused because the decode batch they would join steps
     slower than their TPOT SLO, over `miss_budget`.
   A TPOT miss is split between the sides as the decoding workers' time per token is:
   their measured decode steps are the decode side's part, what their prompt chunks add
   to those steps (local prefills) the prefill side's; a worker prefilling long prompts
   where it decodes misses TPOTs for lack of prefill workers, not of decode ones.
2. Hysteresis: one side must be at or above `high` while the other is at or below `low`
   (a band, so values in between never move anyone), or below `high` and at most
   1/`dominance` of the first: a side far past its edge does not wait for the other's
   last few events to leave the window (one refusal among the few requests that ended
   in it is already full pressure), but a side at or above `high` never gives a worker;
   no move while a switch is under way
   (a worker draining, or a target not yet taken), within `cooldown_s` of the last one,
   or of a worker that took its role less than `dwell_s` ago; nor one that would leave
   the giving side at or above `high` (its pressure x n / (n - 1) for n workers: a move
   that only shifts the shortage makes two workers flap between the layouts).
3. One move at a time: toward prefill, a decode (else colocated) worker becomes prefill;
   toward decode, a prefill (else colocated) worker becomes decode; the least loaded
   candidate goes first. A move that would leave no serving worker able to decode (decode,
   colocated) once done, or none while it drains, is not made; prompts are always taken,
   since a decode worker prefills locally what no prefill worker takes. So two adaptive
   workers move between one prefill + one decode worker and two decode workers (serving
   as two colocated ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.protocol import WorkerRole, WorkerState

_DEFAULT_PREFILL_RATE = 100.0  # tokens/s, until a worker has measured its own


@dataclass(frozen=True)
class ControllerConfig:
    interval_s: float = 1.0  # a decision (and a lease renewal) this often
    lease_ttl_s: float = 5.0  # another router takes over this long after the holder stops
    dwell_s: float = 30.0  # a worker keeps a role at least this long
    cooldown_s: float = 10.0  # between two switches in the cluster
    high: float = 0.8  # a side at or above this asks for a worker
    low: float = 0.3  # ... which the other side gives only at or below this
    dominance: float = 3.0  # ... or below high and at most 1/dominance of the first side's
    miss_budget: float = 0.1  # the share of SLO misses (or refusals) that is full pressure
    window_s: float = 30.0  # SLO attainment and refusals are counted over this window
    ttft_target_s: float = 2.0  # the prefill wait that is full pressure, without TTFT SLOs
    # a decode worker's running batch at full pressure (max_num_seqs), without TPOT SLOs
    batch_cap: int = 64
    history: int = 100  # switches kept in Redis

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"need 0 <= low < high, got {self.low}, {self.high}")
        if not self.dominance > 1:
            raise ValueError(f"dominance must be > 1, got {self.dominance}")
        if not self.lease_ttl_s > self.interval_s > 0:
            raise ValueError("need lease_ttl_s > interval_s > 0")
        for name in ("dwell_s", "cooldown_s", "ttft_target_s", "miss_budget", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch_cap < 1 or self.history < 1:
            raise ValueError("batch_cap and history must be >= 1")


@dataclass(frozen=True)
class WorkerInfo:
    """What the controller knows of one worker (its registry record and its target)."""

    worker_id: str
    role: WorkerRole
    state: WorkerState = WorkerState.SERVING
    adaptive: bool = False
    role_since: float = 0.0
    target: WorkerRole | None = None  # the role the controller set, if any
    queued_prefill_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    running: int = 0
    waiting: int = 0
    free_blocks: int = 1
    total_blocks: int = 1
    decode_step_s: float = 0.0  # its measured decode step (0.0: none yet)
    prefill_stall_s: float = 0.0  # what its prompt chunks add to each decoding step

    @property
    def switching(self) -> bool:
        return self.state is WorkerState.DRAINING or (
            self.target is not None and self.target is not self.role)


@dataclass(frozen=True)
class RouterSignals:
    """The routers' queues and their SLO attainment over the window, summed."""

    queued: int = 0  # requests waiting in the routers' queues
    queued_tokens: int = 0
    finished: int = 0
    refused: int = 0  # all refusals, those below included
    refused_decode: int = 0  # refused for the decode batch they would join (its TPOT)
    ttft_requests: int = 0  # requests with a TTFT SLO that ended
    ttft_misses: int = 0  # all misses, those below included
    ttft_misses_decode: int = 0  # misses whose first token waited mostly for the decode side
    tpot_requests: int = 0
    tpot_misses: int = 0
    ttft_slo_ms_sum: int = 0  # over the ttft_requests: their mean is the TTFT SLO judged by
    tpot_slo_ms_sum: int = 0  # over the tpot_requests
    prompt_tokens: int = 0  # computed for the requests that ended (prefix-cache hits apart)


@dataclass(frozen=True)
class Snapshot:
    now: float  # time.time()
    workers: tuple[WorkerInfo, ...]
    routers: RouterSignals = RouterSignals()
    last_switch: float = 0.0  # time of the latest switch ordered (0.0: none)


@dataclass(frozen=True)
class Pressures:
    prefill: float
    decode: float


@dataclass(frozen=True)
class Move:
    worker_id: str
    from_role: WorkerRole
    to_role: WorkerRole
    reason: str


@dataclass(frozen=True)
class Decision:
    targets: dict[str, WorkerRole]  # every adaptive worker's role after this decision
    moves: tuple[Move, ...]
    pressures: Pressures
    why: str  # what the rule concluded, moves or not


def pressures(snap: Snapshot, config: ControllerConfig) -> Pressures:
    serving = [w for w in snap.workers if w.state is WorkerState.SERVING]
    r = snap.routers
    takers = ([w for w in serving if w.role.prefills]
              or [w for w in serving if w.role.decodes])
    rate = sum(w.prefill_tokens_per_s or _DEFAULT_PREFILL_RATE for w in takers)
    queued = sum(w.queued_prefill_tokens for w in takers) + r.queued_tokens
    wait_s = queued / rate if rate else (math.inf if queued else 0.0)
    ended = r.finished + r.refused
    ttft_s = _share(r.ttft_slo_ms_sum, r.ttft_requests) / 1e3 or config.ttft_target_s
    tpot_s = _share(r.tpot_slo_ms_sum, r.tpot_requests) / 1e3
    budget = config.miss_budget
    busy = r.prompt_tokens / config.window_s / rate if rate else 0.0
    prefill = max(wait_s / ttft_s, busy,
                  _share(r.ttft_misses - r.ttft_misses_decode, r.ttft_requests) / budget,
                  _share(r.refused - r.refused_decode, ended) / budget)
    decoders = [w for w in serving if w.role.decodes]
    measured = [w for w in decoders if w.running and w.decode_step_s]
    step = sum(w.decode_step_s for w in measured)
    stalled = sum(w.prefill_stall_s for w in measured)
    stall_share = stalled / (step + stalled) if stalled > 0 else 0.0
    tpot_misses = _share(r.tpot_misses, r.tpot_requests) / budget
    prefill = max(prefill, tpot_misses * stall_share)
    fills = [max(w.decode_step_s / tpot_s if tpot_s and w.running and w.decode_step_s
                 else w.running / config.batch_cap,
                 1 - w.free_blocks / max(w.total_blocks, 1), 1.0 if w.waiting else 0.0)
             for w in decoders]
    decode = max(sum(fills) / len(fills) if fills else 1.0,
                 tpot_misses * (1 - stall_share),
                 _share(r.ttft_misses_decode, r.ttft_requests) / budget,
                 _share(r.refused_decode, ended) / budget)
    return Pressures(prefill, decode)


def decide(snap: Snapshot, config: ControllerConfig) -> Decision:
    """The module's rule, on `snap`."""
    p = pressures(snap, config)
    targets = {w.worker_id: w.target or w.role for w in snap.workers if w.adaptive}

    def hold(why: str) -> Decision:
        return Decision(targets, (), p, why)

    if not targets:
        return hold("no adaptive worker")
    if any(w.switching for w in snap.workers):
        return hold("a switch is under way")
    if snap.now - snap.last_switch < config.cooldown_s:
        return hold("cooling down after the last switch")
    if _asks(p.prefill, p.decode, config):
        to, sources = WorkerRole.PREFILL, (WorkerRole.DECODE, WorkerRole.COLOCATED)
        reason = f"prefill pressure {p.prefill:.2f} >= {config.high}, decode {p.decode:.2f}"
    elif _asks(p.decode, p.prefill, config):
        to, sources = WorkerRole.DECODE, (WorkerRole.PREFILL, WorkerRole.COLOCATED)
        reason = f"decode pressure {p.decode:.2f} >= {config.high}, prefill {p.prefill:.2f}"
    else:
        return hold("pressures within the band")
    if (after := _left_behind(snap.workers, to, p)) >= config.high:
        # the side that gives would be past its edge once one fewer: the move would only
        # shift the shortage (two workers would flap between the layouts)
        return hold(f"{reason}, but the other side would be at {after:.2f} with one "
                    "worker fewer")
    candidates = [w for w in snap.workers
                  if w.adaptive and w.state is WorkerState.SERVING and w.role in sources
                  and snap.now - w.role_since >= config.dwell_s]
    candidates.sort(key=lambda w: (sources.index(w.role), _load(w), w.worker_id))
    for w in candidates:
        if _keeps_service(snap.workers, w, to):
            targets[w.worker_id] = to
            return Decision(targets, (Move(w.worker_id, w.role, to, reason),), p, reason)
    return hold(f"{reason}, but no worker can move (dwell time, or the last of its kind)")


def _asks(side: float, other: float, config: ControllerConfig) -> bool:
    """Whether a side at pressure `side` gets a worker from one at `other` (step 2)."""
    return side >= config.high and (other <= config.low or (
        other < config.high and side >= config.dominance * other))


def _left_behind(workers: Sequence[WorkerInfo], to: WorkerRole, p: Pressures) -> float:
    """The giving side's pressure once one of its n serving workers has gone: x n / (n - 1).
    A prefill side of one gives its prompts to the decode workers (prefilled locally), so it
    is not projected."""
    serving = [w for w in workers if w.state is WorkerState.SERVING]
    if to is WorkerRole.PREFILL:
        side, n = p.decode, sum(w.role.decodes for w in serving)
    else:
        side, n = p.prefill, sum(w.role is WorkerRole.PREFILL for w in serving)
    return side * n / (n - 1) if n > 1 else 0.0


def _keeps_service(workers: Sequence[WorkerInfo], moving: WorkerInfo, to: WorkerRole) -> bool:
    others = [w.role for w in workers
              if w.state is WorkerState.SERVING and w.worker_id != moving.worker_id]
    after = [*others, to]
    return any(r.decodes for r in others) and any(r.decodes for r in after)


def _load(w: WorkerInfo) -> int:
    return w.running + w.waiting + w.queued_prefill_tokens


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
