"""How much KV transfer time layer-wise streaming hides behind prefill compute, and what the
sending costs the prefill.

One prompt (2,048 tokens by default) on SmolLM2 (fp32, CPU), prefill-only engine, the KV
receiver in a second process (as a decode worker is), ZeroMQ over TCP loopback. Runs per
repeat, interleaved:
- alone: the prefill without a transfer;
- after: the prefill runs, then all 30 layers are sent;
- layerwise: the engine's per-layer hook hands each layer to `send_layer` as soon as it is
  computed, while later layers run;
- after@baseline, layerwise@baseline (with `--baseline PATH`): the same through the
  kvtransfer of an older checkout at PATH (whose parts import as top-level packages),
  with its own receiver process, side by side.
Within each run: the first token (prefill done), the sender seeing DONE (every layer at the
receiver, checked and acknowledged), the time spent inside the `send_layer` calls on the
prefill's thread, and the process's CPU time during the prefill (all its threads: compute,
the sender's I/O thread, ZeroMQ's). Transfer time = DONE - first token when sending after
the prefill; left on the critical path = the same with layer-wise streaming. On a machine
whose cores the prefill fills, the sending work slows the prefill instead of waiting after
it: `--pin` runs the prefill on core 0 (one thread) and the receivers on core 1, as the
workers run pinned, so that cost shows.

    .venv/bin/python -m pdserve.bench.kv_overlap [--prompt-len 2048] [--repeats 5]
        [--threads N] [--pin] [--baseline PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pdserve.bench.child import Child
from pdserve.bench.kvtransfer import BLOCK, Impl, receiver_process
from pdserve.engine import Engine, EngineConfig, ModelConfig, SamplingParams
from pdserve.engine.config import CacheConfig, EngineMode, SchedulerConfig
from pdserve.models import resolve_model


def prefill_engine(model: str, prompt_len: int) -> Engine:
    cfg = ModelConfig.from_pretrained(resolve_model(model))
    return Engine(EngineConfig(
        model=cfg,
        cache=CacheConfig(num_blocks=2 * prompt_len // 16 + 8, enable_prefix_caching=False),
        scheduler=SchedulerConfig(mode=EngineMode.PREFILL_ONLY,
                                  max_num_batched_tokens=prompt_len),
    ))


class Side:
    """One implementation's sender here and receiver process."""

    def __init__(self, impl: Impl, engine: Engine, blocks: int, cpu: int | None):
        m = engine.config.model
        self.child = Child(receiver_process, impl, "zmq", "tcp://127.0.0.1:*", m.num_layers,
                           blocks, cpu)
        self.endpoint = self.child.recv()
        self.sender = impl.sender("zmq", impl.spec(m.num_layers, m.num_kv_heads, m.head_dim))

    def close(self) -> None:
        self.sender.close()
        self.child.stop()


def run_once(engine: Engine, side: Side | None, prompt, tid, mode) -> tuple[float, ...]:
    """Seconds: (prefill until the first token, until DONE at the sender, inside send_layer
    on this thread, process CPU during the prefill)."""
    n, in_send, held = len(prompt), [0.0], []
    if side is not None:
        side.child.ask(("expect", tid, n))

    def layer_hook(layer, k, v):
        if mode == "layerwise":
            t = time.perf_counter()
            side.sender.send_layer(tid, layer, 0, k, v)
            in_send[0] += time.perf_counter() - t
        else:
            held.append((layer, k.clone(), v.clone()))

    cpu0, t0 = time.process_time(), time.perf_counter()
    if side is not None:
        side.sender.begin(tid, side.endpoint, n)
    engine.add_request(tid, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    first = None
    while first is None:
        for out in engine.step(lambda batch: layer_hook if side is not None else None):
            first = out.new_token_ids[0]
    prefill_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    if side is None:
        return prefill_s, prefill_s, 0.0, cpu_s
    for layer, k, v in held:
        side.sender.send_layer(tid, layer, 0, k, v)
    side.sender.finish(tid, first)
    while not (result := side.sender.poll(tid)).status.is_terminal:
        time.sleep(0.0002)
    elapsed = time.perf_counter() - t0
    assert result.status.value == "done", result
    side.sender.release(tid)
    side.child.ask(("release", tid, 0))
    return prefill_s, elapsed, in_send[0], cpu_s


def report(runs: dict[str, list[tuple[float, ...]]]) -> dict:
    def median_ms(values) -> float:
        return statistics.median(values) * 1e3

    # the part after the first token, measured inside each run: free of run-to-run noise
    out = {mode: {"prefill_ms": median_ms(r[0] for r in rs),
                  "after_first_token_ms": median_ms(r[1] - r[0] for r in rs),
                  "in_send_layer_ms": median_ms(r[2] for r in rs),
                  "process_cpu_ms": median_ms(r[3] for r in rs)} for mode, rs in runs.items()}
    alone = out["alone"]
    print(f"\n{'mode':>20} | {'prefill ms':>10} {'vs alone':>9} | {'in send_layer':>13} | "
          f"{'CPU ms':>7} {'vs alone':>8} | {'after 1st token':>15}")
    for mode, o in out.items():
        o["prefill_vs_alone"] = o["prefill_ms"] / alone["prefill_ms"]
        o["cpu_vs_alone"] = o["process_cpu_ms"] / alone["process_cpu_ms"]
        print(f"{mode:>20} | {o['prefill_ms']:10.1f} {o['prefill_vs_alone']:9.3f} | "
              f"{o['in_send_layer_ms']:13.2f} | {o['process_cpu_ms']:7.1f} "
              f"{o['cpu_vs_alone']:8.3f} | {o['after_first_token_ms']:15.1f}")
    for suffix in ("", "@baseline"):
        if "after" + suffix in out:
            left = out["layerwise" + suffix]["after_first_token_ms"]
            transfer = out["after" + suffix]["after_first_token_ms"]
            out["left_share" + suffix] = left / transfer
            print(f"layer-wise{suffix}: {left:.1f} ms of the {transfer:.1f} ms transfer left "
                  f"after the first token ({100 * left / transfer:.1f}%)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads of the prefill (default: %(default)s)")
    ap.add_argument("--pin", action="store_true",
                    help="prefill on core 0 with one thread, receivers on core 1")
    ap.add_argument("--baseline", help="an older checkout to measure side by side")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.pin:  # before any thread starts: ZeroMQ's and the sender's inherit it
        os.sched_setaffinity(0, {0})
        args.threads = 1
    torch.set_num_threads(args.threads)
    engine = prefill_engine(args.model, args.prompt_len)
    blocks = -(-args.prompt_len // BLOCK) + 1
    cpu = 1 if args.pin else None
    sides = {"": Side(Impl(), engine, blocks, cpu)}
    if args.baseline:
        sides["@baseline"] = Side(Impl(args.baseline), engine, blocks, cpu)
    modes = {"alone": None} | {mode + suffix: side for suffix, side in sides.items()
                               for mode in ("after", "layerwise")}
    prompt = torch.randint(1000, 40000, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    runs: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in modes}
    try:
        for suffix, side in sides.items():  # connect, warm up
            run_once(engine, side, prompt, f"warm{suffix}", "after")
        for i in tqdm(range(args.repeats), desc="overlap", file=sys.stderr):
            for mode, side in modes.items():  # interleaved, so drift hits all alike
                runs[mode].append(run_once(engine, side, prompt, f"{mode}-{i}",
                                           mode.partition("@")[0]))
    finally:
        for side in sides.values():
            side.close()
    m = engine.config.model
    kv_mib = args.prompt_len * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4 / 2**20
    print(f"\n{args.prompt_len}-token prompt, {kv_mib:.1f} MiB of KV, {args.threads} prefill "
          f"threads{', pinned' if args.pin else ''}, median of {args.repeats}")
    result = {"prompt_len": args.prompt_len, "threads": args.threads, "pinned": args.pin,
              "kv_mib": kv_mib, **report(runs),
              "runs_s": {mode: [list(r) for r in rs] for mode, rs in runs.items()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
