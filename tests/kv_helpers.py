"""Shared pieces of the KV transport tests: a tiny KV spec, caches, senders and receivers of
each transport kind, a layer-by-layer send and a bounded wait for a terminal result."""

from __future__ import annotations

import time

import torch

from pdserve.kvtransfer.base import KVSpec
from pdserve.kvtransfer.inline_channel import InlineReceiverChannel, InlineSenderChannel
from pdserve.kvtransfer.inproc import InProcHub, InProcReceiver, InProcSender
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.receiver import Receiver
from pdserve.kvtransfer.sender import Sender
from pdserve.kvtransfer.torch_channel import TorchReceiverChannel, TorchSenderChannel

SPEC = KVSpec("tiny", num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
KINDS = ["zmq", "torch", "inproc"]  # inproc: the fake, on the process-wide hub


def caches(num_blocks, block_size, fill=False):
    shape = (SPEC.num_layers, num_blocks, block_size, SPEC.num_kv_heads, SPEC.head_dim)
    return (torch.randn(shape), torch.randn(shape)) if fill else (torch.zeros(shape),
                                                                   torch.zeros(shape))


def make_receiver(kind, kv, bind="tcp://127.0.0.1:*", timeout_s=5.0, curve=None, **channel_kw):
    """A receiver of `kind` over the caches `kv`; `timeout_s`, `channel_kw`: torch only;
    `curve`: the cluster's keys."""
    if kind == "inproc":
        return InProcReceiver(InProcHub.instance(), SPEC, *kv)
    channel = (TorchReceiverChannel(timeout_s=timeout_s, **channel_kw) if kind == "torch"
               else InlineReceiverChannel())
    return Receiver(SPEC, *kv, channel, bind=bind, curve=curve)


def make_sender(kind, spec=SPEC, *, timeout_s=5.0, max_frame_bytes=1 << 20, channel=None,
                **sender_kw):
    """A sender of `kind`; `timeout_s`: the torch group's; `channel` replaces the kind's."""
    if kind == "inproc":
        return InProcSender(InProcHub.instance(), spec, max_frame_bytes)
    if channel is None:
        channel = (TorchSenderChannel(timeout_s=timeout_s) if kind == "torch"
                   else InlineSenderChannel())
    return Sender(spec, channel, max_frame_bytes=max_frame_bytes, **sender_kw)


def wait_for(poll, timeout=5.0):
    """Poll until the transfer is terminal; the result."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = poll()
        if result.status.is_terminal:
            return result
        time.sleep(0.005)
    raise AssertionError(f"not terminal after {timeout}s: {poll()}")


def send_layers(sender, tid, p_cache, p_blocks, n, layers=None):
    pk, pv = p_cache
    for layer in range(SPEC.num_layers) if layers is None else layers:
        for start, end in ((0, n // 2), (n // 2, n)):
            sender.send_layer(tid, layer, start, gather_tokens(pk[layer], p_blocks, start, end),
                              gather_tokens(pv[layer], p_blocks, start, end))


def transfer_in_child(role, endpoint_or_none, conn):
    """Child process body: one torch-transport side that does one transfer and closes, then
    the process exits normally (its exit code tells whether the teardown aborted)."""
    if role == "sender":
        sender = make_sender("torch")
        sender.begin("t", endpoint_or_none, 4)
        send_layers(sender, "t", caches(4, 4, fill=True), [0], 4)
        sender.finish("t", 1)
        conn.send(wait_for(lambda: sender.poll("t")).status.value)
        sender.close()
    else:
        receiver = make_receiver("torch", caches(4, 4))
        receiver.expect("t", [0], 4, lease_s=10)
        conn.send(receiver.endpoint)
        conn.send(wait_for(lambda: receiver.poll("t"), timeout=10).status.value)
        receiver.close()
