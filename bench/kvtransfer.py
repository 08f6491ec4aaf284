"""KV transfer throughput: pdserve's transports against a raw ZMQ send and a memory copy.

For each KV size, one transfer = a single layer's chunk of that many bytes sent by a
`KVSender` into the blocks a `KVReceiver` reserved, until the sender sees DONE (framing,
checksums, scatter and the acknowledgement included). Baselines, same bytes, same run:
a raw ZMQ PUSH/PULL of one frame (copy=False) and a torch tensor copy.

    .venv/bin/python bench/kvtransfer.py [--repeats 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # keep bench/ from shadowing engine

import torch  # noqa: E402
import zmq  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kvtransfer.base import KVSpec, TransferStatus  # noqa: E402
from kvtransfer.zmq_transport import ZmqReceiver, ZmqSender  # noqa: E402

SIZES = [128 << 10, 1 << 20, 8 << 20, 64 << 20]
HEADS, DIM, BLOCK = 3, 64, 16  # SmolLM2's KV shape per layer
TOKEN_BYTES = 2 * HEADS * DIM * 4  # K and V, float32


def transport_times(bind: str, num_bytes: int, repeats: int) -> list[float]:
    tokens = num_bytes // TOKEN_BYTES
    blocks = -(-tokens // BLOCK)
    spec = KVSpec("bench", 1, HEADS, DIM, torch.float32)
    shape = (1, blocks, BLOCK, HEADS, DIM)
    receiver = ZmqReceiver(spec, torch.zeros(shape), torch.zeros(shape), bind=bind)
    sender = ZmqSender(spec)
    k, v = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, HEADS, DIM)
    times = []
    try:
        for i in range(repeats + 1):
            tid = f"t{i}"
            receiver.expect(tid, list(range(blocks)), tokens, timeout_s=60)
            t0 = time.perf_counter()
            sender.begin(tid, receiver.endpoint, tokens)
            sender.send_layer(tid, 0, 0, k, v)
            sender.finish(tid, 0)
            while not (result := sender.poll(tid)).status.is_terminal:
                time.sleep(0.0002)
            assert result.status is TransferStatus.DONE, result
            if i:  # the first one pays for the connection and handshake
                times.append(time.perf_counter() - t0)
            receiver.release(tid)
    finally:
        sender.close()
        receiver.close()
    return times


def raw_zmq_times(bind: str, num_bytes: int, repeats: int) -> list[float]:
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(bind)
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    payload = torch.randn(num_bytes // 4).numpy()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        push.send(payload, copy=False)
        pull.recv(copy=False)
        if i:
            times.append(time.perf_counter() - t0)
    push.close(linger=0)
    pull.close(linger=0)
    return times


def copy_times(num_bytes: int, repeats: int) -> list[float]:
    src = torch.randn(num_bytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float], num_bytes: int) -> dict:
    p50 = statistics.median(times)
    return {"gbps": num_bytes / p50 / 1e9, "p50_ms": p50 * 1e3,
            "p99_ms": sorted(times)[min(len(times) - 1, int(0.99 * len(times)))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = []
    for num_bytes in tqdm(SIZES, desc="kv sizes", file=sys.stderr):
        r = {"bytes": num_bytes}
        for name, bind in (("zmq-tcp", "tcp://127.0.0.1:*"), ("zmq-ipc", f"ipc://{tmp}/kv")):
            r[name] = summarize(transport_times(bind, num_bytes, args.repeats), num_bytes)
            r[f"raw-{name}"] = summarize(raw_zmq_times(bind + "-raw" if "ipc" in bind
                                                       else bind, num_bytes, args.repeats),
                                         num_bytes)
        r["memcpy"] = summarize(copy_times(num_bytes, args.repeats), num_bytes)
        rows.append(r)

    print(f"\n{'size':>8} | {'zmq-tcp GB/s':>12} {'raw tcp':>8} {'ratio':>6} | "
          f"{'zmq-ipc GB/s':>12} {'raw ipc':>8} {'ratio':>6} | {'memcpy':>7} | "
          f"{'tcp p50/p99 ms':>15}")
    for r in rows:
        size = f"{r['bytes'] >> 10} KB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MB"
        t, rt, i, ri = r["zmq-tcp"], r["raw-zmq-tcp"], r["zmq-ipc"], r["raw-zmq-ipc"]
        print(f"{size:>8} | {t['gbps']:12.2f} {rt['gbps']:8.2f} {t['gbps'] / rt['gbps']:6.2f} | "
              f"{i['gbps']:12.2f} {ri['gbps']:8.2f} {i['gbps'] / ri['gbps']:6.2f} | "
              f"{r['memcpy']['gbps']:7.2f} | {t['p50_ms']:7.2f}/{t['p99_ms']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
