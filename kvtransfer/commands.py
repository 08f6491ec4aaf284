"""What the public methods of a sender ask of its I/O thread: typed, immutable commands.

Each names the receiver endpoint it is for; the I/O thread connects (and handshakes) on the
first command for an endpoint and holds the others back until the receiver accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kvtransfer.messages import Abort, Done, Message


@dataclass(frozen=True, slots=True)
class Connect:
    """`begin`: open the connection and handshake early, while the prefill computes."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class SendChunk:
    """`send_layer`: K and V as the caller handed them over (possibly views), staged into
    frames by the I/O thread; skipped if the transfer has ended by then."""

    endpoint: str
    transfer_id: str
    layer: int
    start: int
    k: torch.Tensor
    v: torch.Tensor
    ready: torch.cuda.Event | None = None  # GPU K/V: recorded on the producer's stream

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass(frozen=True, slots=True)
class SendDone:
    """`finish`: skipped if the transfer has ended by then."""

    endpoint: str
    done: Done


@dataclass(frozen=True, slots=True)
class SendAbort:
    """`abort`: always sent, also while the sender closes."""

    endpoint: str
    abort: Abort


@dataclass(frozen=True, slots=True)
class SendControl:
    """A payload channel's own message (SenderChannel.post): sent on the accepted
    connection to `endpoint`, dropped when there is none; never opens one."""

    endpoint: str
    message: Message


Command = Connect | SendChunk | SendDone | SendAbort | SendControl
