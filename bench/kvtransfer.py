"""KV transfer throughput: pdserve's transports against a raw ZMQ send and a memory copy.

For each KV size, one transfer = a single layer's chunk of that many bytes sent by a
`KVSender` into the blocks a `KVReceiver` (in a second process, as a decode worker is)
reserved, until the sender sees DONE (staging, framing, checksums, scatter and the
acknowledgement included), for zmq-tcp, zmq-ipc and torch (gloo over TCP, control on ZMQ).
Baselines, same bytes, same run: a raw ZMQ send of one frame (copy=False) to a second
process that answers with one byte, and a torch tensor copy. Both processes run with the
malloc settings of an engine process (engine.host_memory), as the workers do.

    .venv/bin/python bench/kvtransfer.py [--repeats 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import zmq
from tqdm import tqdm

from pdserve.engine.host_memory import tune_malloc
from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.transports import TransportKind, make_receiver, make_sender

SIZES = [128 << 10, 1 << 20, 8 << 20, 64 << 20]
HEADS, DIM, BLOCK = 3, 64, 16  # SmolLM2's KV shape per layer
TOKEN_BYTES = 2 * HEADS * DIM * 4  # K and V, float32
mp = mp.get_context("spawn")  # children start clean: no inherited ZMQ context or threads


def receiver_process(kind: str, bind: str, spec: KVSpec, blocks: int, conn) -> None:
    """Child process: hosts a receiver (as a decode worker would) with `blocks` blocks of
    BLOCK tokens per layer, sends its endpoint, then obeys ("expect" | "release", transfer
    id, tokens) commands from `conn`, answering each, until None."""
    tune_malloc()
    shape = (spec.num_layers, blocks, BLOCK, spec.num_kv_heads, spec.head_dim)
    receiver = make_receiver(TransportKind(kind), spec, torch.zeros(shape), torch.zeros(shape),
                             bind)
    conn.send(receiver.endpoint)
    while (cmd := conn.recv()) is not None:
        op, tid, tokens = cmd
        if op == "expect":
            receiver.expect(tid, list(range(blocks)), tokens, timeout_s=60)
        else:
            receiver.release(tid)
        conn.send("ok")
    receiver.close()


def _raw_process(bind: str, conn) -> None:
    """Child process: receives one frame at a time and answers with one byte."""
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.bind(bind)
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        frame = sock.recv(copy=False)
        if len(frame) == 0:
            break
        sock.send(b"k")
    sock.close(linger=0)


def transport_times(kind: str, bind: str, num_bytes: int, repeats: int) -> list[float]:
    tokens = num_bytes // TOKEN_BYTES
    blocks = -(-tokens // BLOCK)
    spec = KVSpec("bench", 1, HEADS, DIM, torch.float32)
    conn, child_conn = mp.Pipe()
    child = mp.Process(target=receiver_process, args=(kind, bind, spec, blocks, child_conn))
    child.start()
    endpoint = conn.recv()
    sender = make_sender(TransportKind(kind), spec)
    k, v = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, HEADS, DIM)
    times = []
    try:
        for i in range(repeats + 1):
            tid = f"t{i}"
            conn.send(("expect", tid, tokens))
            conn.recv()
            t0 = time.perf_counter()
            sender.begin(tid, endpoint, tokens)
            sender.send_layer(tid, 0, 0, k, v)
            sender.finish(tid, 0)
            while not (result := sender.poll(tid)).status.is_terminal:
                time.sleep(0.0002)
            assert result.status is TransferStatus.DONE, result
            if i:  # the first one pays for the connection and handshake
                times.append(time.perf_counter() - t0)
            sender.release(tid)
            conn.send(("release", tid, 0))
            conn.recv()
    finally:
        sender.close()
        conn.send(None)
        child.join()
    return times


def raw_zmq_times(bind: str, num_bytes: int, repeats: int) -> list[float]:
    conn, child_conn = mp.Pipe()
    child = mp.Process(target=_raw_process, args=(bind, child_conn))
    child.start()
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(conn.recv())
    payload = torch.randn(num_bytes // 4).numpy()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        sock.send(payload, copy=False)
        sock.recv()
        if i:
            times.append(time.perf_counter() - t0)
    sock.send(b"")
    child.join()
    sock.close(linger=0)
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
    tune_malloc()
    tmp = tempfile.mkdtemp()
    rows = []
    for num_bytes in tqdm(SIZES, desc="kv sizes", file=sys.stderr):
        r = {"bytes": num_bytes}
        for name, bind in (("zmq-tcp", "tcp://127.0.0.1:*"), ("zmq-ipc", f"ipc://{tmp}/kv")):
            r[name] = summarize(transport_times("zmq", bind, num_bytes, args.repeats),
                                num_bytes)
            r[f"raw-{name}"] = summarize(raw_zmq_times(bind + "-raw" if "ipc" in bind
                                                       else bind, num_bytes, args.repeats),
                                         num_bytes)
        r["torch-gloo"] = summarize(
            transport_times("torch", "tcp://127.0.0.1:*", num_bytes, args.repeats), num_bytes)
        r["memcpy"] = summarize(copy_times(num_bytes, args.repeats), num_bytes)
        rows.append(r)

    print(f"\n{'size':>8} | {'zmq-tcp GB/s':>12} {'raw tcp':>8} {'ratio':>6} | "
          f"{'zmq-ipc GB/s':>12} {'raw ipc':>8} {'ratio':>6} | {'gloo GB/s':>9} {'ratio':>6} | "
          f"{'memcpy':>7} | {'tcp p50/p99 ms':>15} | {'gloo p50/p99 ms':>15}")
    for r in rows:
        size = f"{r['bytes'] >> 10} KB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MB"
        t, rt, i, ri = r["zmq-tcp"], r["raw-zmq-tcp"], r["zmq-ipc"], r["raw-zmq-ipc"]
        g = r["torch-gloo"]
        print(f"{size:>8} | {t['gbps']:12.2f} {rt['gbps']:8.2f} {t['gbps'] / rt['gbps']:6.2f} | "
              f"{i['gbps']:12.2f} {ri['gbps']:8.2f} {i['gbps'] / ri['gbps']:6.2f} | "
              f"{g['gbps']:9.2f} {g['gbps'] / rt['gbps']:6.2f} | "
              f"{r['memcpy']['gbps']:7.2f} | {t['p50_ms']:7.2f}/{t['p99_ms']:.2f} | "
              f"{g['p50_ms']:7.2f}/{g['p99_ms']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
