"""Pick a transport by name: what a worker's `--transport zmq|torch` flag selects, and the
in-process fake that tests select the same way.

ZMQ and TORCH are one control plane (sender.Sender, receiver.Receiver) composed with the
payload channel of the kind; INPROC is the fake of kvtransfer.inproc, on the process-wide
hub unless one is given.
"""

from __future__ import annotations

import enum

import torch

from pdserve.kvtransfer.base import KVReceiver, KVSender, KVSpec
from pdserve.kvtransfer.curve import CurveKeyring
from pdserve.kvtransfer.inline_channel import InlineReceiverChannel, InlineSenderChannel
from pdserve.kvtransfer.inproc import InProcHub, InProcReceiver, InProcSender
from pdserve.kvtransfer.receiver import Receiver
from pdserve.kvtransfer.sender import Sender


class TransportKind(enum.Enum):
    ZMQ = "zmq"  # payload in the ZMQ message (TCP or IPC)
    TORCH = "torch"  # payload over torch.distributed (gloo on CPU, NCCL on GPU), ZMQ control
    INPROC = "inproc"  # in-process fake: direct calls through an InProcHub, for tests


def make_sender(kind: TransportKind, spec: KVSpec, *, device: str | torch.device = "cpu",
                handshake_timeout_s: float = 5.0, ack_timeout_s: float = 10.0,
                keepalive_s: float = 1.0, hub: InProcHub | None = None,
                curve: CurveKeyring | None = None) -> KVSender:
    """`device` is where the torch transport stages payloads (the KV cache's device);
    `curve`: the cluster's keys (ZMQ and TORCH: their control plane), None for none."""
    if kind is TransportKind.INPROC:
        return InProcSender(hub or InProcHub.instance(), spec)
    if kind is TransportKind.TORCH:
        from pdserve.kvtransfer.torch_channel import TorchSenderChannel  # torch.distributed

        channel = TorchSenderChannel(device)
    else:
        channel = InlineSenderChannel()
    return Sender(spec, channel, handshake_timeout_s=handshake_timeout_s,
                  ack_timeout_s=ack_timeout_s, keepalive_s=keepalive_s, curve=curve)


def make_receiver(kind: TransportKind, spec: KVSpec, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, bind: str, *, hub: InProcHub | None = None,
                  curve: CurveKeyring | None = None) -> KVReceiver:
    """`bind` is a ZMQ endpoint (`tcp://HOST:*` picks a free port); INPROC ignores it, and
    `curve` (the cluster's keys; kvtransfer.curve)."""
    if kind is TransportKind.INPROC:
        return InProcReceiver(hub or InProcHub.instance(), spec, k_cache, v_cache)
    if kind is TransportKind.TORCH:
        from pdserve.kvtransfer.torch_channel import TorchReceiverChannel  # torch.distributed

        channel = TorchReceiverChannel()
    else:
        channel = InlineReceiverChannel()
    return Receiver(spec, k_cache, v_cache, channel, bind=bind, curve=curve)
