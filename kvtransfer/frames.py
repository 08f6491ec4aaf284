"""The one frame builder of every transport: a layer's token range as frames of at most
`max_frame_bytes`, each a ChunkHeader plus a staged payload (K then V, token-major).

Frames, not whole layers: while one frame is on the wire the next is staged, and the
receiver checks and scatters frames as they come. The payload goes into memory from the
channel's `alloc` (a reused scratch buffer, a fresh tensor, a GPU tensor); host payloads
carry the xxh3-64 of their bytes, payloads on a GPU carry 0 (hashing would copy them to the
host).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.kvtransfer.messages import ChunkHeader, checksum

Alloc = Callable[[int], torch.Tensor]  # nbytes -> uint8 tensor of that many elements


@dataclass(frozen=True)
class Frame:
    header: ChunkHeader
    payload: torch.Tensor  # uint8 [2 * tokens * kv_heads * head_dim * element size]


def check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless K and V are both `[tokens, kv_heads, head_dim]` alike."""
    if k.shape != v.shape or k.dim() != 3 or k.dtype != v.dtype:
        raise ValueError(f"K {tuple(k.shape)} {k.dtype} and V {tuple(v.shape)} {v.dtype} must "
                         "both be [tokens, kv_heads, head_dim] of one dtype")


def host_alloc(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def ready_event(k: torch.Tensor) -> torch.cuda.Event | None:
    """For GPU K/V handed to another thread: an event on the producer's current stream, so
    the stager's copies wait for the kernels that computed K/V. None for host tensors."""
    if not k.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(k.device))
    return event


def stage_frames(transfer_id: str, layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                 max_frame_bytes: int, alloc: Alloc = host_alloc,
                 ready: torch.cuda.Event | None = None) -> Iterator[Frame]:
    """Stage K and V of positions [start, start + tokens) frame by frame. A frame's payload
    is only as long-lived as `alloc` makes it: from a reused buffer, it is valid until the
    next frame is taken. K and V are only read; `ready` (from `ready_event`) orders the
    copies after their producer. Raises ValueError as `check_kv`."""
    check_kv(k, v)
    if ready is not None:
        stream = torch.cuda.current_stream(k.device)
        stream.wait_event(ready)
        with torch.inference_mode():
            # the producer may free K/V once we drop them: keep their memory until these
            # copies on our stream are done
            k.record_stream(stream)
            v.record_stream(stream)
    tokens, heads, dim = k.shape
    token_bytes = 2 * heads * dim * k.element_size()
    step = max(1, max_frame_bytes // max(1, token_bytes))
    dtype = str(k.dtype).removeprefix("torch.")
    # host K/V as numpy byte rows, made once per chunk: numpy copies without waking torch's
    # intra-op pool (which would compete with the engine's threads on an I/O thread), and
    # a small frame's staging is dominated by the per-call cost of making such views
    host = _byte_rows(k, v)
    for i in range(0, tokens, step):
        n = min(step, tokens - i)
        payload = alloc(n * token_bytes)
        if host is not None and payload.device.type == "cpu":
            out = payload.numpy().reshape(2, n, heads, -1)
            out[0] = host[0][i:i + n]
            out[1] = host[1][i:i + n]
        else:
            # inference mode: K/V may be inference tensors
            with torch.inference_mode():
                kv = payload.view(k.dtype).view(2, n, heads, dim)
                if payload.device == k.device == v.device:
                    torch.stack((k[i:i + n], v[i:i + n]), out=kv)  # one op, not two copies
                else:  # to or from a GPU
                    kv[0].copy_(k[i:i + n])
                    kv[1].copy_(v[i:i + n])
        digest = 0 if payload.is_cuda else checksum(memoryview(payload.numpy()))
        yield Frame(ChunkHeader(transfer_id, layer, start + i, start + i + n, dtype, heads, dim,
                                digest), payload)


def _byte_rows(k: torch.Tensor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """K and V as numpy `[tokens, kv_heads, head_dim * element size]` uint8 views, when
    both are host tensors that allow one (unit stride in head_dim); else None."""
    if k.device.type != "cpu" or v.device.type != "cpu" or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        return None
    return k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy()


class Scratch:
    """One growing host buffer handed out again and again: for payloads that are consumed
    (copied or scattered) before the next frame is staged. One owner thread."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            with torch.inference_mode():
                self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]
