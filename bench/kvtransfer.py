"""KV transfer throughput: pdserve's transports against a raw ZMQ send and a memory copy.

For each KV size, one transfer = a single layer's chunk of that many bytes sent by a
`KVSender` into the blocks a `KVReceiver` (in a second process, as a decode worker is)
reserved, until the sender sees DONE (staging, framing, checksums, scatter and the
acknowledgement included), for zmq-tcp, zmq-ipc and torch (gloo over TCP, control on ZMQ).
Baselines, same bytes, same run: a raw ZMQ send of one frame (copy=False) to a second
process that answers with one byte; the same through the threads a KVSender has ("raw
through threads": the caller hands the frame to an I/O thread through a mailbox and waits
for it to see the answer, two hand-offs in all), which is the floor of any sender built
that way; and a torch tensor copy; with `--baseline PATH`, the
same transfers through the kvtransfer of an older checkout at PATH (one whose parts import
as top-level packages, `kvtransfer.transports`), side by side; with `--curve`, the same
transfers with the cluster's CURVE keys (authenticated, encrypted control plane and inline
payload; kvtransfer.curve) beside those without. Both processes run with the malloc
settings of an engine process (engine.host_memory), as the workers do.

    .venv/bin/python -m pdserve.bench.kvtransfer [--repeats 20] [--json PATH]
        [--baseline PATH | --curve] [--sizes 128K 1M 8M 64M]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
from tqdm import tqdm

from pdserve.bench.child import Child
from pdserve.deploy.spec import make_curve_keys
from pdserve.engine.host_memory import tune_malloc
from pdserve.kvtransfer.mailbox import Mailbox

SIZES = [128 << 10, 1 << 20, 8 << 20, 64 << 20]
HEADS, DIM, BLOCK = 3, 64, 16  # SmolLM2's KV shape per layer
TOKEN_BYTES = 2 * HEADS * DIM * 4  # K and V, float32
TRANSPORTS = (("zmq-tcp", "zmq"), ("zmq-ipc", "zmq"), ("torch-gloo", "torch"))


@dataclass(frozen=True)
class Impl:
    """Which kvtransfer to run: this tree's, or an older checkout's (`path`), whose
    kvtransfer imports as the top-level package `kvtransfer`."""

    path: str | None = None
    curve: object = None  # the cluster's CURVE keys (protocol.CurveKeys); None: none

    @property
    def package(self) -> str:
        return "kvtransfer" if self.path else "pdserve.kvtransfer"

    def module(self, name: str):
        if self.path and self.path not in sys.path:
            sys.path.insert(0, self.path)
        return importlib.import_module(f"{self.package}.{name}")

    def spec(self, layers: int, heads: int = HEADS, dim: int = DIM):
        return self.module("base").KVSpec("bench", layers, heads, dim, torch.float32)

    def sender(self, kind: str, spec):
        transports = self.module("transports")
        extra = {"curve": self.curve} if self.curve is not None else {}
        return transports.make_sender(transports.TransportKind(kind), spec, **extra)


def receiver_process(conn, impl: Impl, kind: str, bind: str, layers: int, blocks: int,
                     cpu: int | None = None) -> None:
    """Child process: hosts a receiver (as a decode worker would) with `blocks` blocks of
    BLOCK tokens per layer, sends its endpoint, then obeys ("expect" | "release", transfer
    id, tokens) commands from `conn`, answering each, until None. `cpu`: the core to pin to."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
        torch.set_num_threads(1)
    tune_malloc()
    spec, transports = impl.spec(layers), impl.module("transports")
    shape = (spec.num_layers, blocks, BLOCK, spec.num_kv_heads, spec.head_dim)
    extra = {"curve": impl.curve} if impl.curve is not None else {}
    receiver = transports.make_receiver(transports.TransportKind(kind), spec,
                                        torch.zeros(shape), torch.zeros(shape), bind, **extra)
    conn.send(receiver.endpoint)
    while (cmd := conn.recv()) is not None:
        op, tid, tokens = cmd
        if op == "expect":
            receiver.expect(tid, list(range(blocks)), tokens, 60)  # the lease, positional
            # (an older checkout names it timeout_s)
        else:
            receiver.release(tid)
        conn.send("ok")
    receiver.close()


def _raw_process(conn, bind: str) -> None:
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


def transport_times(impls: dict[str, Impl], kind: str, bind: str, num_bytes: int,
                    repeats: int) -> dict[str, list[float]]:
    """Transfer times of each implementation, taking turns transfer by transfer (each with
    its own receiver process), so the load of a shared machine hits them alike."""
    tokens = num_bytes // TOKEN_BYTES
    blocks = -(-tokens // BLOCK)
    sides = {}
    for name, impl in impls.items():
        child = Child(receiver_process, impl, kind,
                      bind + name if bind.startswith("ipc") else bind, 1, blocks)
        sides[name] = (impl.sender(kind, impl.spec(1)), child, child.recv())
    k, v = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, HEADS, DIM)
    times: dict[str, list[float]] = {name: [] for name in impls}
    try:
        for i in range(repeats + 1):
            for name, (sender, child, endpoint) in sides.items():
                tid = f"t{i}"
                child.ask(("expect", tid, tokens))
                t0 = time.perf_counter()
                sender.begin(tid, endpoint, tokens)
                sender.send_layer(tid, 0, 0, k, v)
                sender.finish(tid, 0)
                if hasattr(sender, "wait"):
                    result = sender.wait(tid, 30.0)
                else:  # an older checkout: poll
                    while not (result := sender.poll(tid)).status.is_terminal:
                        time.sleep(0.0002)
                assert result.status.value == "done", result
                if i:  # the first one pays for the connection and handshake
                    times[name].append(time.perf_counter() - t0)
                sender.release(tid)
                child.ask(("release", tid, 0))
    finally:
        for sender, child, _ in sides.values():
            sender.close()
            child.stop()
    return times


def raw_zmq_times(bind: str, num_bytes: int, repeats: int) -> list[float]:
    child = Child(_raw_process, bind)
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(child.recv())
    payload = torch.randn(num_bytes // 4).numpy()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        sock.send(payload, copy=False)
        sock.recv()
        if i:
            times.append(time.perf_counter() - t0)
    sock.send(b"")
    child.stop()
    sock.close(linger=0)
    return times


def threaded_raw_times(bind: str, num_bytes: int, repeats: int) -> list[float]:
    """`raw_zmq_times` with the socket on an I/O thread, as a KVSender's is: the caller
    posts the frame to the thread's mailbox and waits for an event the thread sets when
    the answer comes."""
    child = Child(_raw_process, bind)
    endpoint = child.recv()
    mailbox, answered = Mailbox(), threading.Event()

    def io() -> None:
        sock = zmq.Context.instance().socket(zmq.PAIR)
        sock.connect(endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mailbox.fd, zmq.POLLIN)
        while True:
            for item in mailbox.take():
                sock.send(item, copy=False)
                if len(item) == 0:
                    sock.close(linger=1000)
                    return
            if sock in mailbox.poll(poller, 1000):
                sock.recv()
                answered.set()

    thread = threading.Thread(target=io, daemon=True)
    thread.start()
    payload = torch.randn(num_bytes // 4).numpy()
    times = []
    for i in range(repeats + 1):
        answered.clear()
        t0 = time.perf_counter()
        mailbox.put(payload)
        answered.wait()
        if i:
            times.append(time.perf_counter() - t0)
    mailbox.put(b"")
    thread.join()
    mailbox.close()
    child.stop()
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


def measure(num_bytes: int, repeats: int, tmp: str, other: tuple[str, Impl] | None) -> dict:
    """`other`: (key prefix, implementation) measured beside this tree's, taking turns."""
    r = {"bytes": num_bytes, "memcpy": summarize(copy_times(num_bytes, repeats), num_bytes)}
    binds = {"zmq-tcp": "tcp://127.0.0.1:*", "zmq-ipc": f"ipc://{tmp}/kv",
             "torch-gloo": "tcp://127.0.0.1:*"}
    for name in ("zmq-tcp", "zmq-ipc"):
        raw_bind = binds[name] + ("-raw" if "ipc" in name else "")
        r[f"raw-{name}"] = summarize(raw_zmq_times(raw_bind, num_bytes, repeats), num_bytes)
        r[f"threaded-raw-{name}"] = summarize(
            threaded_raw_times(raw_bind + ("-thr" if "ipc" in name else ""), num_bytes,
                               repeats), num_bytes)
    impls = {"": Impl()} | (dict([other]) if other else {})
    for name, kind in TRANSPORTS:
        for prefix, times in transport_times(impls, kind, binds[name], num_bytes,
                                             repeats).items():
            r[prefix + name] = summarize(times, num_bytes)
    return r


def print_table(rows: list[dict], other: str | None) -> None:
    """`other`: the prefix of the implementation measured beside this tree's ("baseline-":
    ratio this / baseline; "curve-": ratio curve / without)."""
    ratio = "curve / plain" if other == "curve-" else "/ baseline"
    print(f"\n{'size':>7} {'transport':>10} | {'GB/s':>6} {'raw GB/s':>8} {'/ raw':>6} "
          f"{'thr GB/s':>8} {'/ thr':>6} | {'p50 / p99 ms':>15} {'raw p50':>8} {'thr p50':>8}"
          + (f" | {other[:-1] + ' GB/s':>13} {ratio:>13}" if other else ""))
    for r in rows:
        size = f"{r['bytes'] >> 10} KB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MB"
        for name, _ in TRANSPORTS:
            wire = name.replace("torch-gloo", "zmq-tcp")
            t, raw, thr = r[name], r["raw-" + wire], r["threaded-raw-" + wire]
            line = (f"{size:>7} {name:>10} | {t['gbps']:6.2f} {raw['gbps']:8.2f} "
                    f"{t['gbps'] / raw['gbps']:6.2f} {thr['gbps']:8.2f} "
                    f"{t['gbps'] / thr['gbps']:6.2f} | {t['p50_ms']:7.2f} / {t['p99_ms']:5.2f} "
                    f"{raw['p50_ms']:8.2f} {thr['p50_ms']:8.2f}")
            if other:
                b = r[other + name]
                share = b["gbps"] / t["gbps"] if other == "curve-" else t["gbps"] / b["gbps"]
                line += f" | {b['gbps']:13.2f} {share:13.2f}"
            print(line)
        print(f"{size:>7} {'memcpy':>10} | {r['memcpy']['gbps']:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--baseline", help="an older checkout to measure side by side")
    side.add_argument("--curve", action="store_true",
                      help="measure with the cluster's CURVE keys beside without them")
    ap.add_argument("--sizes", nargs="+", type=lambda t: int(t[:-1]) << {"K": 10, "M": 20}[t[-1]],
                    default=SIZES, help="KV bytes per transfer, e.g. 128K 64M")
    args = ap.parse_args()
    tune_malloc()
    tmp = tempfile.mkdtemp()
    other = (("baseline-", Impl(args.baseline)) if args.baseline
             else ("curve-", Impl(curve=make_curve_keys())) if args.curve else None)
    rows = [measure(num_bytes, args.repeats, tmp, other)
            for num_bytes in tqdm(args.sizes, desc="kv sizes", file=sys.stderr)]
    print_table(rows, other[0] if other else None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
