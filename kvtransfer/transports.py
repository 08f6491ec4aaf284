"""Pick a transport by name: what a worker's `--transport zmq|torch` flag selects."""

from __future__ import annotations

import enum

import torch

from pdserve.kvtransfer.base import KVReceiver, KVSender, KVSpec


class TransportKind(enum.Enum):
    ZMQ = "zmq"  # payload in the ZMQ message (TCP or IPC)
    TORCH = "torch"  # payload over torch.distributed (gloo on CPU, NCCL on GPU), ZMQ control


def make_sender(kind: TransportKind, spec: KVSpec, *, device: str | torch.device = "cpu",
                handshake_timeout_s: float = 5.0, ack_timeout_s: float = 10.0) -> KVSender:
    if kind is TransportKind.TORCH:
        from pdserve.kvtransfer.torch_transport import TorchSender

        return TorchSender(spec, device, handshake_timeout_s=handshake_timeout_s,
                           ack_timeout_s=ack_timeout_s)
    from pdserve.kvtransfer.zmq_transport import ZmqSender

    return ZmqSender(spec, handshake_timeout_s=handshake_timeout_s, ack_timeout_s=ack_timeout_s)


def make_receiver(kind: TransportKind, spec: KVSpec, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, bind: str) -> KVReceiver:
    """`bind` is a ZMQ endpoint (`tcp://HOST:*` picks a free port)."""
    if kind is TransportKind.TORCH:
        from pdserve.kvtransfer.torch_transport import TorchReceiver

        return TorchReceiver(spec, k_cache, v_cache, bind=bind)
    from pdserve.kvtransfer.zmq_transport import ZmqReceiver

    return ZmqReceiver(spec, k_cache, v_cache, bind=bind)
