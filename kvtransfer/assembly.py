"""Receiver-side bookkeeping, shared by every transport.

An `Assembly` checks each arriving frame of one transfer against what was expected (layer,
token range within [start, num_tokens), dtype, shape, checksum, no overlap with a frame
already taken), scatters it into the reserved blocks (which hold the range from their
first slot on: the decode engine's cached prefix blocks are never named here), and decides
DONE or FAILED. `AssemblingReceiver` keeps the
assemblies of one receiver behind a lock, implements the bookkeeping half of `KVReceiver`
and takes frames and Done messages (`take_frame`, `take_done`); a transport adds how they
arrive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from pdserve.kvtransfer.base import KVReceiver, KVSpec, TransferResult, TransferStatus
from pdserve.kvtransfer.layout import HostScatter, slot_index
from pdserve.kvtransfer.messages import ChunkHeader, Done, checksum


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FrameError(ValueError):
    """A frame that must fail its transfer; the message says why."""


class Assembly:
    def __init__(self, transfer_id: str, block_ids: Sequence[int], num_tokens: int,
                 spec: KVSpec, lease_s: float, start: int = 0):
        if not 0 <= start < num_tokens:
            raise ValueError(f"transfer {transfer_id!r}: start {start} outside "
                             f"[0, {num_tokens})")
        self.transfer_id = transfer_id
        self.block_ids = list(block_ids)
        self._table: torch.Tensor | None = None  # block_ids on the cache's device, made once
        self._host_table: np.ndarray | None = None  # block_ids for HostScatter, made once
        self.num_tokens = num_tokens
        self.start = start  # the receiver holds [0, start); block_ids hold [start, num_tokens)
        self.spec = spec
        self.lease_s = lease_s
        self.deadline = time.monotonic() + lease_s  # renewed by every sign of progress
        self.status = TransferStatus.PENDING
        self.reason = ""
        self.first_token_id: int | None = None
        self.note = b""  # the Done's hand-off note, kept once DONE
        self.owner: bytes | None = None  # the connection whose messages it takes (claim)
        # per layer: token ranges taken so far
        self._ranges: list[list[tuple[int, int]]] = [[] for _ in range(spec.num_layers)]
        self.num_bytes = 0

    @property
    def result(self) -> TransferResult:
        return TransferResult(self.status, self.first_token_id, self.reason, self.note,
                              self.num_bytes)

    def fail(self, reason: str) -> None:
        if not self.status.is_terminal:
            self.status, self.reason = TransferStatus.FAILED, reason

    def expire(self, now: float | None = None) -> bool:
        """Fail the transfer if its lease ran out; True if it did just now."""
        if self.status.is_terminal or (now or time.monotonic()) < self.deadline:
            return False
        self.fail(f"lease expired: no KV nor keep-alive from the sender for {self.lease_s:g} s")
        return True

    def renew(self) -> str | None:
        """A sign of progress from the sender: the lease runs `lease_s` from now. Why the
        transfer cannot be renewed (it ended), or None."""
        if self.expire():
            return self.reason
        if self.status.is_terminal:
            return self.reason or f"transfer is already {self.status.value}"
        self.deadline = time.monotonic() + self.lease_s
        return None

    def accept(self, header: ChunkHeader, payload: bytes | memoryview | torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor,
               host: HostScatter | None = None) -> None:
        """Check one frame and scatter it into this transfer's blocks of `k_cache`/`v_cache`
        (`[num_layers, num_blocks, block_size, kv_heads, head_dim]`). Raises FrameError.

        `payload` is host bytes, whose checksum is verified, or a uint8 GPU tensor (NCCL),
        which is not hashed. `host`: the caches' HostScatter, for host bytes into a host
        cache of the wire's dtype."""
        if self.status.is_terminal:
            raise FrameError(f"transfer is already {self.status.value}")
        spec = self.spec
        if not 0 <= header.layer < spec.num_layers:
            raise FrameError(f"layer {header.layer} outside [0, {spec.num_layers})")
        if not self.start <= header.start < header.end <= self.num_tokens:
            raise FrameError(f"token range [{header.start}, {header.end}) outside "
                             f"[{self.start}, {self.num_tokens})")
        expected = (_dtype_name(spec.dtype), spec.num_kv_heads, spec.head_dim)
        got = (header.dtype, header.num_kv_heads, header.head_dim)
        if got != expected:
            raise FrameError(f"frame dtype/heads/head_dim {got} != expected {expected}")
        size = header.payload_bytes(spec.dtype.itemsize)
        on_gpu = isinstance(payload, torch.Tensor)
        got_size = payload.numel() if on_gpu else len(payload)
        if got_size != size:
            raise FrameError(f"payload has {got_size} bytes, header implies {size}")
        if not on_gpu and checksum(payload) != header.checksum:
            raise FrameError(f"checksum mismatch in layer {header.layer} "
                             f"[{header.start}, {header.end})")
        taken = self._ranges[header.layer]
        if any(s < header.end and header.start < e for s, e in taken):
            raise FrameError(f"duplicate tokens in layer {header.layer} "
                             f"[{header.start}, {header.end})")
        if host is not None and not on_gpu:
            if self._host_table is None:
                self._host_table = np.asarray(self.block_ids, dtype=np.int64)
            rows = host.slots(self._host_table, header.start - self.start,
                              header.end - self.start)
            host.scatter(header.layer, rows, payload)
        else:
            self._scatter(header, payload, k_cache, v_cache)
        taken.append((header.start, header.end))
        self.num_bytes += size
        self.status = TransferStatus.TRANSFERRING
        self.deadline = time.monotonic() + self.lease_s

    def _scatter(self, header: ChunkHeader, payload, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> None:
        """The torch path: a GPU payload or cache, or a cache of another dtype."""
        spec = self.spec
        if isinstance(payload, torch.Tensor):
            flat = payload.view(spec.dtype)
        else:
            if isinstance(payload, bytes) or memoryview(payload).readonly:
                payload = bytearray(payload)  # frombuffer warns on read-only memory
            flat = torch.frombuffer(payload, dtype=spec.dtype)
        kv = flat.view(2, header.num_tokens, spec.num_kv_heads, spec.head_dim)
        if self._table is None:
            self._table = torch.tensor(self.block_ids, dtype=torch.long, device=k_cache.device)
        # one slot index for K and V: the index ops cost as much as a small frame's copy
        idx = slot_index(self._table, k_cache.shape[2], header.start - self.start,
                         header.end - self.start, k_cache.device)
        for cache, part in ((k_cache, kv[0]), (v_cache, kv[1])):
            cache[header.layer].flatten(0, 1).index_copy_(
                0, idx, part.to(device=cache.device, dtype=cache.dtype))

    def complete(self, done: Done) -> None:
        """The sender says it sent everything: DONE if every layer covers every token."""
        if self.status.is_terminal:
            return
        if done.num_tokens != self.num_tokens:
            return self.fail(f"sender sent {done.num_tokens} tokens, {self.num_tokens} "
                             "were reserved")
        if done.start != self.start:
            return self.fail(f"sender sent from position {done.start}, the receiver "
                             f"expected {self.start}")
        for layer, taken in enumerate(self._ranges):
            if sum(e - s for s, e in taken) != self.num_tokens - self.start:
                return self.fail(f"layer {layer} is missing tokens")
        self.status, self.first_token_id = TransferStatus.DONE, done.first_token_id
        self.note = done.note


class AssemblingReceiver(KVReceiver):
    """`expect`, `poll`, `abort` and `release` over a lock-guarded map of assemblies."""

    def __init__(self, spec: KVSpec, k_cache: torch.Tensor, v_cache: torch.Tensor):
        self.spec, self.k_cache, self.v_cache = spec, k_cache, v_cache
        self._host = (HostScatter(k_cache, v_cache)
                      if HostScatter.fits(k_cache, v_cache, spec.dtype) else None)
        self._lock = threading.Lock()
        self._assemblies: dict[str, Assembly] = {}

    def expect(self, transfer_id: str, block_ids: Sequence[int], num_tokens: int,
               lease_s: float, start: int = 0) -> None:
        with self._lock:
            if transfer_id in self._assemblies:
                raise ValueError(f"transfer {transfer_id!r} is already expected")
            num_blocks, block_size = self.k_cache.shape[1], self.k_cache.shape[2]
            if num_tokens - start > len(block_ids) * block_size:
                raise ValueError(f"transfer {transfer_id!r}: {num_tokens - start} tokens do "
                                 f"not fit in {len(block_ids)} blocks of {block_size}")
            if any(not 0 <= b < num_blocks for b in block_ids):
                raise ValueError(f"transfer {transfer_id!r}: block ids outside "
                                 f"[0, {num_blocks})")
            self._assemblies[transfer_id] = Assembly(
                transfer_id, block_ids, num_tokens, self.spec, lease_s, start)

    def poll(self, transfer_id: str) -> TransferResult:
        with self._lock:
            a = self._assemblies.get(transfer_id)
            if a is None:
                return TransferResult(TransferStatus.FAILED, reason="unknown transfer")
            a.expire()
            return a.result

    def abort(self, transfer_id: str, reason: str) -> None:
        with self._lock:
            if (a := self._assemblies.get(transfer_id)) is not None:
                a.fail(reason)

    def renew(self, transfer_id: str) -> str | None:
        """The sender's keep-alive: renew the transfer's lease. Why it cannot be (unknown
        here, or ended), or None."""
        with self._lock:
            a = self._assemblies.get(transfer_id)
            if a is None:
                return f"receiver does not expect transfer {transfer_id!r}"
            return a.renew()

    def claim(self, transfer_id: str, peer: bytes) -> bool:
        """Whether `peer` (a connection) may speak for the transfer: the first connection to
        name an expected transfer owns it from then on. True for an id not expected here
        (what the message then gets is the usual refusal)."""
        with self._lock:
            a = self._assemblies.get(transfer_id)
            if a is None:
                return True
            if a.owner is None:
                a.owner = peer
            return a.owner == peer

    def release(self, transfer_id: str) -> None:
        with self._lock:
            if (a := self._assemblies.pop(transfer_id, None)) is not None:
                a.fail("released")

    def take_frame(self, header: ChunkHeader,
                   payload: bytes | memoryview | torch.Tensor) -> str | None:
        """Check and scatter one frame; why its transfer failed, or None if taken."""
        with self._lock:
            a = self._assemblies.get(header.transfer_id)
            if a is None:
                return f"receiver does not expect transfer {header.transfer_id!r}"
            if a.expire():
                return a.reason
            try:
                a.accept(header, payload, self.k_cache, self.v_cache, self._host)
            except FrameError as e:
                a.fail(str(e))
                return a.reason
            except (RuntimeError, ValueError) as e:  # a bug, not the peer's: fail, stay up
                a.fail(f"could not scatter the frame: {e}")
                return a.reason
            return None

    def take_done(self, done: Done) -> TransferResult:
        """The sender sent everything: the transfer's outcome (DONE or FAILED)."""
        with self._lock:
            a = self._assemblies.get(done.transfer_id)
            if a is None:
                return TransferResult(TransferStatus.FAILED, reason="receiver does not expect "
                                      f"transfer {done.transfer_id!r}")
            if not a.expire():
                a.complete(done)
            return a.result

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            for a in self._assemblies.values():
                a.fail(reason)
