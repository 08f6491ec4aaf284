"""How much KV transfer time layer-wise streaming hides behind prefill compute.

One 2,048-token prompt on SmolLM2 (fp32, CPU), prefill-only engine, the KV receiver in a
second process (as a decode worker is), ZeroMQ over TCP loopback. Three runs per repeat:
- prefill alone (no transfer);
- send after prefill: the prefill runs, then all 30 layers are sent;
- layer-wise: the engine's per-layer hook sends each layer as soon as it is computed,
  while later layers run.
Within each run two instants are taken: the first token (prefill done) and the sender seeing
DONE (every layer at the receiver, checked and acknowledged). Transfer time = DONE - first
token when sending after prefill; left on the critical path = DONE - first token with
layer-wise streaming, as a share of it. The prefill's own time with and without streaming
is reported beside it: on a machine whose cores the prefill already fills, the sending
work slows the prefill instead of waiting after it.

    .venv/bin/python bench/kv_overlap.py [--prompt-len 2048] [--repeats 5] [--threads N]
                                         [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pdserve.bench.kvtransfer import BLOCK, mp, receiver_process
from pdserve.engine import Engine, EngineConfig, ModelConfig, SamplingParams
from pdserve.engine.config import CacheConfig, EngineMode, SchedulerConfig
from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.transports import TransportKind, make_sender
from pdserve.models import resolve_model


def prefill_engine(model: str, prompt_len: int) -> Engine:
    cfg = ModelConfig.from_pretrained(resolve_model(model))
    return Engine(EngineConfig(
        model=cfg,
        cache=CacheConfig(num_blocks=2 * prompt_len // 16 + 8, enable_prefix_caching=False),
        scheduler=SchedulerConfig(mode=EngineMode.PREFILL_ONLY,
                                  max_num_batched_tokens=prompt_len),
    ))


def run_once(engine: Engine, sender, conn, endpoint, prompt, tid, mode) -> tuple[float, float]:
    """(seconds from prefill start to the first token, to DONE at the sender)."""
    n = len(prompt)
    if mode != "alone":
        conn.send(("expect", tid, n))
        conn.recv()
    held = []

    def layer_hook(layer, k, v):
        if mode == "layerwise":
            sender.send_layer(tid, layer, 0, k, v)
        else:
            held.append((layer, k.clone(), v.clone()))

    t0 = time.perf_counter()
    if mode != "alone":
        sender.begin(tid, endpoint, n)
    engine.add_request(tid, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    first = None
    while first is None:
        for out in engine.step(lambda batch: layer_hook if mode != "alone" else None):
            first = out.new_token_ids[0]
    prefill_s = time.perf_counter() - t0
    if mode == "alone":
        return prefill_s, prefill_s
    for layer, k, v in held:
        sender.send_layer(tid, layer, 0, k, v)
    sender.finish(tid, first)
    while not (result := sender.poll(tid)).status.is_terminal:
        time.sleep(0.0002)
    elapsed = time.perf_counter() - t0
    assert result.status is TransferStatus.DONE, result
    sender.release(tid)
    conn.send(("release", tid, 0))
    conn.recv()
    return prefill_s, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads of the prefill (default: %(default)s)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = prefill_engine(args.model, args.prompt_len)
    m = engine.config.model
    spec = KVSpec(args.model, m.num_layers, m.num_kv_heads, m.head_dim, torch.float32)
    conn, child_conn = mp.Pipe()
    blocks = -(-args.prompt_len // BLOCK) + 1
    child = mp.Process(target=receiver_process,
                       args=("zmq", "tcp://127.0.0.1:*", spec, blocks, child_conn))
    child.start()
    endpoint = conn.recv()
    sender = make_sender(TransportKind.ZMQ, spec)
    prompt = torch.randint(1000, 40000, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    runs: dict[str, list[tuple[float, float]]] = {"alone": [], "after": [], "layerwise": []}
    try:
        run_once(engine, sender, conn, endpoint, prompt, "warm", "after")  # connect, warm
        for i in tqdm(range(args.repeats), desc="overlap", file=sys.stderr):
            for mode in runs:  # interleaved, so drift hits all three alike
                runs[mode].append(run_once(engine, sender, conn, endpoint, prompt,
                                           f"{mode}-{i}", mode))
    finally:
        sender.close()
        conn.send(None)
        child.join()

    def median_ms(values) -> float:
        return statistics.median(values) * 1e3

    prefill = {mode: median_ms(p for p, _ in rs) for mode, rs in runs.items()}
    # the part after the first token, measured inside each run: free of run-to-run noise
    tail = {mode: median_ms(t - p for p, t in rs) for mode, rs in runs.items()}
    transfer, left = tail["after"], tail["layerwise"]
    slowdown = prefill["layerwise"] - prefill["alone"]
    kv_mb = args.prompt_len * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4 / 2**20
    result = {"prompt_len": args.prompt_len, "threads": args.threads, "kv_mib": kv_mb,
              "prefill_ms": prefill, "after_first_token_ms": tail, "transfer_ms": transfer,
              "left_on_critical_path_ms": left, "left_share": left / transfer,
              "prefill_slowdown_ms": slowdown,
              "runs_s": {mode: [list(r) for r in rs] for mode, rs in runs.items()}}
    print(f"\n{args.prompt_len}-token prompt, {kv_mb:.0f} MiB of KV, {args.threads} prefill "
          f"threads, median of {args.repeats}")
    print(f"  prefill alone                    {prefill['alone']:8.1f} ms")
    print(f"  send after prefill: transfer     {transfer:8.1f} ms after the first token")
    print(f"  layer-wise: left after prefill   {left:8.1f} ms = {100 * left / transfer:.1f}% "
          "of the transfer")
    print(f"  layer-wise: prefill itself       {prefill['layerwise']:8.1f} ms "
          f"({slowdown:+.1f} ms against prefill alone)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
