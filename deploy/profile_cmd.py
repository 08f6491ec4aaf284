"""`pdserve profile`: a cost profile (protocol.cost_profile), what the simulator and the
planner read about the hardware.

Two paths:
- measuring (the default): times the real engine, KV transfers and the router on this
  machine and fits the cost model (bench.costmodel.measure); needs the `server` extra
  (cli.main checks it through `measures`);
- roofline (`--gpu NAME --model-size NAME [--tp N]`): derives a profile from a GPU's
  datasheet and a model's shapes (bench.costmodel.hardware), importing no torch.
`--list-gpus` prints the GPUs and model shapes the roofline knows, with their sources.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

RESULTS = Path("bench/results/costmodel")

DESCRIPTION = """\
Write a cost profile: what one worker's engine step, a KV transfer and the router's path
cost, for one model on one machine, as versioned JSON for the simulator and planner.

Measuring (default): times the real engine's step() on this machine (SmolLM2-135M, fp32,
--threads torch threads, pinned): prefill chunks of 16..2,048 tokens at offsets 0, 512 and
1,536, decode batches of 1..64 sequences over 64..2,048 context tokens each, and mixed
steps (a prompt chunk beside a decode batch); fits
    step_s = base_s + max(floor_s, token_s * tokens) + pair_s * pairs + context_s * context
             + seq_s * decoding sequences
by relative-error least squares; times decode and prefill steps beside a co-runner
prefilling on another core (how much a neighbouring worker slows a step on this host);
times KV transfers of 1..64 MB over zmq on loopback (latency + bytes / bandwidth); and
starts a 1 prefill + 1 decode cluster to measure the router's own time per request, the
token stream's delay and a decode batch's cost in the serving path (--skip-cluster leaves
those at 0). About 3.5 minutes on a 2-core machine; --quick takes a handful of points in seconds.
Writes bench/results/costmodel/profile_cpu.json (relative to the working directory) and,
with --plot, a plot of fitted against measured step times.

Roofline (--gpu NAME --model-size NAME [--tp N]): derives the profile from the GPU's
datasheet figures and the model's published shapes with stated efficiencies (MFU 0.5,
bandwidth 0.8, ...), no measurement and no torch; writes
bench/results/costmodel/profile_<gpu>_<model>_tp<N>.json. --list-gpus lists both tables.
"""


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine's cost model (or a GPU's "
                                       "roofline) for the simulator",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where the JSON goes (default: see above)")
    m = p.add_argument_group("measuring this machine")
    m.add_argument("--model", default="smollm2-135m",
                   help="built-in model name or local HF folder (default: %(default)s)")
    m.add_argument("--threads", type=int, default=1,
                   help="torch threads, as one worker per core runs (default: %(default)s)")
    m.add_argument("--repeats", type=int, default=3,
                   help="runs per step point, median kept (default: %(default)s)")
    m.add_argument("--quick", action="store_true",
                   help="a handful of points and small transfers (seconds; a first look)")
    m.add_argument("--skip-cluster", action="store_true",
                   help="do not start a 1P1D cluster: router_s and stream_s stay 0")
    m.add_argument("--kv-capacity-tokens", type=int,
                   help="KV one worker holds (default: the deployment's 512 blocks x 16)")
    m.add_argument("--plot", type=Path, help="also write a PNG of fitted vs measured steps")
    r = p.add_argument_group("roofline of a public GPU (no measurement)")
    r.add_argument("--gpu", help="a GPU of --list-gpus, e.g. H100-SXM")
    r.add_argument("--model-size", help="a model of --list-gpus, e.g. llama-3.1-8b")
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default: 1)")
    r.add_argument("--list-gpus", action="store_true",
                   help="list the GPUs and model shapes the roofline knows, and exit")
    p.set_defaults(func=cmd_profile)


def measures(args: argparse.Namespace) -> bool:
    """Whether this `pdserve profile` measures the machine (and so needs the server extra)."""
    return not (args.list_gpus or args.gpu or args.model_size)


def cmd_profile(args: argparse.Namespace) -> int:
    if args.list_gpus:
        return _list()
    if measures(args):
        return _measure(args)
    if not (args.gpu and args.model_size):
        raise ValueError("a roofline profile needs both --gpu and --model-size")
    from pdserve.bench.costmodel.hardware import roofline

    profile = roofline(args.gpu, args.model_size, args.tp)
    out = args.out or RESULTS / f"profile_{args.gpu}_{args.model_size}_tp{args.tp}.json"
    _write(profile, out)
    return 0


def _list() -> int:
    from pdserve.bench.costmodel.hardware import gpus, models

    print("GPUs (--gpu):")
    for g in gpus().values():
        print(f"  {g.key:14} {g.name:26} {g.bf16_dense_tflops:7.1f} TFLOPS bf16  "
              f"{g.hbm_TBps:5.2f} TB/s  {g.hbm_GB:4.0f} GB  {g.source}")
    print("models (--model-size):")
    for m in models().values():
        print(f"  {m.key:14} {m.name:36} {m.parameters / 1e9:7.3f} B params  {m.source}")
    return 0


def _measure(args: argparse.Namespace) -> int:
    from pdserve.bench.costmodel.measure import Options, measure

    command = ["pdserve", "profile", "--model", args.model, "--threads", str(args.threads),
               "--repeats", str(args.repeats)]
    command += [flag for flag, on in (("--quick", args.quick),
                                      ("--skip-cluster", args.skip_cluster)) if on]
    if args.kv_capacity_tokens:
        command += ["--kv-capacity-tokens", str(args.kv_capacity_tokens)]
    opts = Options(model=args.model, threads=args.threads, quick=args.quick,
                   skip_cluster=args.skip_cluster, repeats=args.repeats,
                   kv_capacity_tokens=args.kv_capacity_tokens, command=shlex.join(command))
    profile = measure(opts)
    _write(profile, args.out or RESULTS / "profile_cpu.json")
    fit = profile.sources["step_fit"]
    print(f"step fit over {fit['points']} points: median error {100 * fit['median_rel_err']:.1f}%"
          f", p90 {100 * fit['p90_rel_err']:.1f}%, knee {fit['knee_tokens']:.1f} tokens")
    if args.plot:
        from pdserve.bench.costmodel.plot import plot_profile

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_profile(profile, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _write(profile, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    s, t = profile.step, profile.transfer
    print(f"{profile.source} profile -> {out}\n"
          f"  step: base {1e3 * s.base_s:.3f} ms, floor {1e3 * s.floor_s:.3f} ms, "
          f"token {1e6 * s.token_s:.3f} us, pair {1e9 * s.pair_s:.4f} ns, "
          f"context {1e9 * s.context_s:.3f} ns (knee {s.knee_tokens:.0f} tokens)\n"
          f"  transfer: {1e3 * t.latency_s:.3f} ms + bytes / {t.bytes_per_s / 1e9:.2f} GB/s; "
          f"KV {profile.kv_bytes_per_token} B/token, capacity {profile.kv_capacity_tokens} "
          f"tokens; router {1e3 * profile.router_s:.2f} ms, stream {1e3 * profile.stream_s:.2f} ms")
