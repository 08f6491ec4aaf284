"""`pdserve profile`'s measuring path: this machine's cost profile, from the real engine.

`measure(options)` runs, in order, each phase with a progress bar on stderr:
1. the machine's probes (bench.costmodel.machine: copy bandwidth, matmul FLOP/s);
2. engine steps (bench.costmodel.steps) with torch threads = `threads`, this process pinned
   to that many cores as a worker pins itself, fp32 on CPU;
3. KV transfers over zmq on loopback (bench.costmodel.transfer), still pinned;
4. unless `skip_cluster`, the router's path on a 1P1D cluster (bench.costmodel.router_path),
   the pin released first so the workers get their own cores;
then fits the step and transfer models (bench.costmodel.fit) and returns the CostProfile.
Its `sources` record the command, the grid, every measured point, the fits' residuals and
the ratios of the fitted terms to this machine's probed roofline.

The defaults take about two and a half minutes on a 2-core machine with SmolLM2-135M (the
cluster's start about 40 s of it); `quick` (a handful of points, small transfers) takes
seconds beyond loading the model.
KV capacity: the deployment's default (deploy.spec.ClusterSpec: 512 blocks of 16 tokens)
unless given.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from pdserve.bench.costmodel import machine
from pdserve.bench.costmodel.contention import measure_contention
from pdserve.bench.costmodel.fit import fit_step, fit_transfer
from pdserve.bench.costmodel.steps import FULL, QUICK, measure_steps
from pdserve.bench.costmodel.transfer import QUICK_SIZES, SIZES, measure_transfers
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import ModelConfig
from pdserve.models import DEFAULT_MODEL, resolve_model
from pdserve.protocol.cost_profile import CostProfile


@dataclass(frozen=True)
class Options:
    model: str = DEFAULT_MODEL
    threads: int = 1
    quick: bool = False
    skip_cluster: bool = False
    repeats: int = 3
    transfer_repeats: int = 5
    router_requests: int = 16
    kv_capacity_tokens: int | None = None
    command: str = ""  # the command line, recorded in the profile

    def __post_init__(self) -> None:
        if self.threads < 1 or self.repeats < 1 or self.transfer_repeats < 1 \
                or self.router_requests < 1:
            raise ValueError("threads, repeats and request counts must be >= 1")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise ValueError("kv_capacity_tokens must be >= 1")


@contextlib.contextmanager
def _pinned(count: int):
    """This process on its first `count` cores for the block, as a worker pins itself."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(sorted(before)[:count]))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True)


def measure(opts: Options) -> CostProfile:
    path = resolve_model(opts.model)
    cfg = ModelConfig.from_pretrained(path)
    torch.set_num_threads(opts.threads)
    grid = replace(QUICK if opts.quick else FULL, repeats=opts.repeats)
    sizes = QUICK_SIZES if opts.quick else SIZES
    cores = sorted(os.sched_getaffinity(0))
    cores_usable = len(cores)
    other_core = cores[opts.threads] if len(cores) > opts.threads else None
    with _pinned(opts.threads):
        about = machine.describe(opts.threads, cores_usable)
        with _bar(grid.num_points, "engine steps") as bar:
            steps = measure_steps(path, grid, bar)
        with _bar(len(sizes), "KV transfers") as bar:
            transfers = measure_transfers(sizes, cfg.num_layers, opts.transfer_repeats, bar)
        if opts.quick:
            contention = {"decode": 0.0, "prefill": 0.0, "note": "--quick: not measured"}
        else:
            with _bar(3, "beside a co-runner") as bar:
                contention = measure_contention(path, other_core, bar)
    if opts.skip_cluster:
        router = {"router_s": 0.0, "stream_s": 0.0,
                  "note": "not measured (--skip-cluster): router_s and stream_s are 0"}
    else:
        from pdserve.bench.costmodel.router_path import measure_router  # starts a cluster

        with _bar(opts.router_requests, "router (1P1D cluster)") as bar:
            router = measure_router(opts.model, cfg.vocab_size, opts.threads,
                                    opts.router_requests, bar)
    step_fit = fit_step(steps)
    serve_seq_s = 0.0
    if "batch_tpot_s" in router:
        # the engine's bare step for the batch the serving path stepped: BATCH sequences
        # over the prompt and half the output on average
        b = router["batch"]
        context = b * (router["prompt_tokens"] + router["batch_output_tokens"] // 2)
        bare = step_fit.model.step_s(b, 0, context, b)
        serve_seq_s = max(0.0, (router["batch_tpot_s"] - bare) / b)
        router["bare_step_s"] = bare
    transfer_fit = fit_transfer([b for b, _ in transfers], [s for _, s in transfers])
    default = ClusterSpec()
    capacity = opts.kv_capacity_tokens or default.num_blocks * default.block_size
    return CostProfile(
        source="measured",
        machine=about,
        model=machine.model_fields(opts.model, cfg),
        kv_bytes_per_token=cfg.kv_bytes_per_token(4),
        kv_capacity_tokens=capacity,
        step=step_fit.model,
        transfer=transfer_fit.model,
        router_s=router["router_s"],
        stream_s=router["stream_s"],
        contention_decode=contention["decode"],
        serve_seq_s=serve_seq_s,
        contention_prefill=contention["prefill"],
        sources={
            "command": opts.command,
            "method": "pdserve profile (bench/costmodel/measure.py): the real engine's "
                      "step() timed; fp32, CPU",
            "kv_capacity": ("given" if opts.kv_capacity_tokens else
                            f"ClusterSpec default: {default.num_blocks} blocks x "
                            f"{default.block_size} tokens"),
            "step_fit": step_fit.summary(),
            "transfer_fit": {**transfer_fit.summary(), "transport": "zmq tcp loopback"},
            "router": router,
            "contention": contention,
            "roofline_ratios": machine.roofline_ratios(step_fit.model, cfg, about),
            "grid": asdict(grid),
            # [kind, tokens, pairs, context, seconds, seqs]: to plot or fit again
            "step_points": [[o.kind, o.tokens, o.pairs, o.context, o.seconds, o.seqs]
                            for o in steps],
            "transfer_points": [list(p) for p in transfers],
        },
    )
