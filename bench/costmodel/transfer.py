"""KV transfer times on this machine: the points `fit.fit_transfer` fits.

One transfer is what a prefill worker sends for one prompt: a `KVSender` (zmq over TCP on
loopback, as two workers on one machine use it) streams every layer's K and V of the
prompt's tokens into the blocks a `KVReceiver` in a second process reserved, as a decode
worker does, until the sender sees DONE (staging, framing, checksums, the scatter into the
receiver's cache and the acknowledgement included). The receiver process is
bench.kvtransfer's, pinned to the last core as a decode worker on its own core; the sender
runs in this process. The KV has SmolLM2's per-layer shape (3 KV heads x 64, fp32, which
that receiver uses) and `layers` layers: the model's layer count sets the framing.

Lifecycle: `measure_transfers(sizes, layers, repeats, bar)` starts the receiver process,
times `repeats` transfers of each size after one discarded (the first pays for the
connection), stops the process, and returns (bytes, seconds) pairs, one per transfer.
"""

from __future__ import annotations

import os
import time

import torch

from pdserve.bench.child import Child
from pdserve.bench.kvtransfer import BLOCK, DIM, HEADS, TOKEN_BYTES, Impl, receiver_process
from pdserve.engine.host_memory import tune_malloc

SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)
QUICK_SIZES = (64 << 10, 1 << 20, 8 << 20)
KIND = "zmq"
BIND = "tcp://127.0.0.1:*"
POLL_S = 0.0002  # the sender is polled as a prefill worker's loop polls it


def measure_transfers(sizes: tuple[int, ...], layers: int, repeats: int,
                      bar) -> list[tuple[int, float]]:
    """Timed transfers of every size in `sizes` (KV bytes over all `layers`); `bar` (tqdm)
    advances once per size."""
    tune_malloc()
    impl = Impl()
    tokens_of = {size: max(1, size // (layers * TOKEN_BYTES)) for size in sizes}
    blocks = -(-max(tokens_of.values()) // BLOCK)
    cores = sorted(os.sched_getaffinity(0))
    child = Child(receiver_process, impl, KIND, BIND, layers, blocks, cores[-1])
    sender = impl.sender(KIND, impl.spec(layers))
    points: list[tuple[int, float]] = []
    try:
        endpoint = child.recv()
        ids = iter(range(1 << 30))
        for size in sizes:
            tokens = tokens_of[size]
            k, v = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, HEADS, DIM)
            for i in range(repeats + 1):
                seconds = _one(sender, child, endpoint, f"t{next(ids)}", layers, k, v)
                if i:
                    points.append((layers * tokens * TOKEN_BYTES, seconds))
            bar.update()
    finally:
        sender.close()
        child.stop()
    return points


def _one(sender, child: Child, endpoint: str, tid: str, layers: int, k: torch.Tensor,
         v: torch.Tensor) -> float:
    tokens = k.shape[0]
    child.ask(("expect", tid, tokens))
    t0 = time.perf_counter()
    sender.begin(tid, endpoint, tokens)
    for layer in range(layers):
        sender.send_layer(tid, layer, 0, k, v)
    sender.finish(tid, 0)
    while not (result := sender.poll(tid)).status.is_terminal:
        time.sleep(POLL_S)
    seconds = time.perf_counter() - t0
    sender.release(tid)
    child.ask(("release", tid, 0))
    if result.status.value != "done":
        raise RuntimeError(f"KV transfer {tid} {result.status.value}: {result.reason}")
    return seconds
