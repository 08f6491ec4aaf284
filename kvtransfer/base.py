"""The transport seam: a sender on the prefill side, a receiver on the decode side.

Life of a transfer (keyed by the router's `transfer_id`, never a worker-local id):
1. PENDING       the receiver `expect`s it (blocks reserved by the decode engine) and the
                 sender `begin`s it (the receiver's endpoint is known). Both are told the
                 same `start`: the receiver holds positions [0, start) already (the decode
                 engine's prefix cache), so only [start, num_tokens) travels.
2. TRANSFERRING  the sender streams one frame per (layer, token range) as prefill computes
                 them; the receiver checks each frame (checksum, shape, range, no duplicate)
                 and scatters it into the reserved blocks.
3. DONE          the sender's `finish` carries the first token; the receiver has every layer
                 of every token from `start` on, acknowledges, and the decode engine can
                 admit the request.
   FAILED        a bad frame, an abort on either side, a lease or ack deadline, or a peer
                 that vanished or refused the handshake. Both sides stop touching the
                 transfer's memory.

Ownership: the receiver writes only into the blocks named in `expect`, and only until the
transfer is DONE or FAILED; the blocks stay the decode engine's, which frees them (on
FAILED too). With a `start` past 0 the receiver is never given the blocks of [0, start)
(cached blocks other requests may read), so no frame can reach them.
The sender does not copy on the caller's thread: `send_layer` keeps references
to the K and V it is given and the sender's own thread copies them into staging memory the
sender owns (frames of at most `max_frame_bytes`), then drops the references. The caller
hands over tensors that nothing writes again (a layer's freshly computed K/V), never a
buffer it reuses. Every method is thread-safe; `abort`, `release` and `close` are
idempotent.

Authentication (ZMQ and TORCH transports; kvtransfer.curve). The keys are the cluster's
(protocol.CurveKeys), made once when it starts and handed to each side in its
configuration; a transport only applies them and never logs them. Given keys, a receiver
takes messages only from peers that hold the cluster's client key (a ZAP handler refuses
the rest during the ZMTP handshake) and a sender talks only to receivers that hold the
server key; every control message and inline payload is encrypted and authenticated by
CURVE. Within the cluster, a transfer's messages are taken only from the connection that
first named it, so a peer on another connection cannot write into it or end it. Without
keys (loopback, the one-machine default) any local process that reaches the endpoint is
heard; the transfer id, 128 random bits, is then all that keeps it out of a transfer.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.kvtransfer.messages import Handshake


class TransferStatus(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED)


@dataclass(frozen=True)
class TransferResult:
    status: TransferStatus
    first_token_id: int | None = None  # set once DONE
    reason: str = ""  # why, when FAILED
    note: bytes = b""  # the sender's opaque hand-off note; set on the receiver's DONE result
    num_bytes: int = 0  # KV payload bytes the receiver took for this transfer so far


@dataclass(frozen=True)
class KVSpec:
    """What both sides must agree on to exchange KV (checked by the handshake)."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def handshake(self, transport: str = "zmq") -> Handshake:
        return Handshake(self.model_id, self.num_layers, self.num_kv_heads, self.head_dim,
                         str(self.dtype).removeprefix("torch."), transport)


class KVReceiver(ABC):
    """Decode side: owns an endpoint and writes arriving KV into reserved blocks."""

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where senders reach this receiver."""

    @abstractmethod
    def expect(self, transfer_id: str, block_ids: Sequence[int], num_tokens: int,
               lease_s: float, start: int = 0) -> None:
        """Announce a transfer of positions [start, num_tokens) into `block_ids`, which
        hold them from their first slot on (position `start` at slot 0 of the first block;
        so `start` is a whole number of this cache's blocks), under a lease: it fails when
        `lease_s` pass with no sign of progress from the sender (a frame, or the keep-alive
        it sends while its job waits or computes), so the lease measures the sender's
        silence, not the prefill queue. Frames outside that range fail the transfer, and
        it is DONE only once every layer covers all of it. Raises ValueError for a
        transfer id already expected, a `start` outside [0, num_tokens), and block ids
        outside the cache or too few to hold the range."""

    @abstractmethod
    def poll(self, transfer_id: str) -> TransferResult:
        """Current state; FAILED with a reason for an id this receiver does not know."""

    @abstractmethod
    def abort(self, transfer_id: str, reason: str) -> None:
        """Fail the transfer now; later frames for it are dropped."""

    @abstractmethod
    def release(self, transfer_id: str) -> None:
        """Forget a transfer (any state; a live one is aborted first)."""

    @abstractmethod
    def close(self) -> None:
        """Fail every live transfer and free the endpoint."""


class KVSender(ABC):
    """Prefill side: streams a transfer's KV, layer by layer, to a receiver's endpoint."""

    @abstractmethod
    def begin(self, transfer_id: str, endpoint: str, num_tokens: int, start: int = 0) -> None:
        """Open a transfer of positions [start, num_tokens) to `endpoint` (the receiver
        holds [0, start) already and was told the same `start`). Raises ValueError for an
        id already begun or a `start` outside [0, num_tokens)."""

    @abstractmethod
    def send_layer(self, transfer_id: str, layer: int, start: int, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Queue K and V `[tokens, kv_heads, head_dim]` of positions [start, start + tokens)
        of one layer, and return at once: no copy, no checksum, never the network.
        Positions below the transfer's `start` are dropped (the receiver holds them).

        `k` and `v` may be non-contiguous views (a column slice of a fused qkv output) and
        inference-mode tensors. The sender holds references to them until its I/O thread has
        staged them into frames; the caller must not modify them in place after this call
        (the prefill hands over each layer's freshly computed K/V, which nothing writes
        again). GPU K/V are read after the work queued so far on the caller's current
        stream. Raises ValueError for an id never begun or for K/V of different shapes."""

    @abstractmethod
    def finish(self, transfer_id: str, first_token_id: int, note: bytes = b"") -> None:
        """Everything was sent; the receiver checks completeness and acknowledges. `note` is
        opaque to kvtransfer: it reaches the receiver's DONE result unchanged."""

    @abstractmethod
    def poll(self, transfer_id: str) -> TransferResult:
        """DONE once the receiver acknowledged; FAILED for an unknown id."""

    @abstractmethod
    def wait(self, transfer_id: str, timeout_s: float) -> TransferResult:
        """Block until the transfer is DONE or FAILED (as `poll` then says), at most
        `timeout_s`: after that, its state as it stands. Wakes as the verdict is recorded,
        so a caller with nothing else to do sees it without polling."""

    @abstractmethod
    def abort(self, transfer_id: str, reason: str) -> None:
        """Stop sending and tell the receiver; idempotent."""

    @abstractmethod
    def release(self, transfer_id: str) -> None:
        """Forget a transfer (any state; a live one is aborted first). Callers release every
        transfer they began once they have read its outcome."""

    @abstractmethod
    def close(self) -> None:
        """Fail every live transfer and release sockets and threads."""
