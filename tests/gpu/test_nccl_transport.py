"""The torch transport over NCCL between two GPUs of this machine, and GPU K/V staged on the
sender's I/O thread (skips without CUDA)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.inline_channel import InlineReceiverChannel, InlineSenderChannel
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.receiver import Receiver
from pdserve.kvtransfer.sender import Sender
from pdserve.kvtransfer.torch_channel import TorchReceiverChannel, TorchSenderChannel
from pdserve.kvtransfer.torch_pairs import backend_for

pytestmark = pytest.mark.gpu


def test_nccl_transfer_between_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL point-to-point needs two GPUs (one rank per device)")
    spec = KVSpec("tiny", 2, 2, 64, torch.bfloat16)
    src, dst = torch.device("cuda:0"), torch.device("cuda:1")
    assert backend_for(src) == "nccl"
    shape = (2, 16, 16, 2, 64)
    pk, pv = (torch.randn(shape, device=src, dtype=torch.bfloat16) for _ in range(2))
    receiver = Receiver(spec, torch.zeros(shape, device=dst, dtype=torch.bfloat16),
                        torch.zeros(shape, device=dst, dtype=torch.bfloat16),
                        TorchReceiverChannel())
    sender = Sender(spec, TorchSenderChannel(device=src))
    try:
        n, blocks = 40, [3, 1, 7]
        receiver.expect("t", [0, 1, 2], n, lease_s=30)
        sender.begin("t", receiver.endpoint, n)
        for layer in range(2):
            sender.send_layer("t", layer, 0, gather_tokens(pk[layer], blocks, 0, n),
                              gather_tokens(pv[layer], blocks, 0, n))
        sender.finish("t", 9)
        while not sender.poll("t").status.is_terminal:
            pass
        assert sender.poll("t").status is TransferStatus.DONE
        for layer in range(2):
            assert torch.equal(gather_tokens(receiver.k_cache[layer], [0, 1, 2], 0, n).cpu(),
                               gather_tokens(pk[layer], blocks, 0, n).cpu())
    finally:
        sender.close()
        receiver.close()


def test_gpu_kv_of_a_side_stream_is_staged_after_the_kernels_that_made_it():
    """send_layer returns before staging; the I/O thread's copy must wait for the producer's
    stream (here a side stream kept busy first) and keep K/V's memory until it is done."""
    spec = KVSpec("tiny", 1, 2, 64, torch.float32)
    n, width = 256, 2 * 2 * 64
    receiver = Receiver(spec, torch.zeros(1, 16, 16, 2, 64), torch.zeros(1, 16, 16, 2, 64),
                        InlineReceiverChannel())
    sender = Sender(spec, InlineSenderChannel())
    side = torch.cuda.Stream()
    try:
        receiver.expect("t", list(range(16)), n, timeout_s=30)
        sender.begin("t", receiver.endpoint, n)
        with torch.inference_mode(), torch.cuda.stream(side):
            busy = torch.randn(4096, 4096, device="cuda")
            for _ in range(20):  # tens of ms of work queued before K/V are written
                busy = torch.tanh(busy @ busy)
            kv = busy[:n, :width] * 0 + torch.arange(n * width, device="cuda",
                                                        dtype=torch.float32).view(n, width)
            k, v = kv[:, :128].reshape(n, 2, 64), kv[:, 128:].reshape(n, 2, 64)
            sender.send_layer("t", 0, 0, k, v)
            del kv, k, v, busy  # the producer lets go at once; the sender holds them
        sender.finish("t", 1)
        while not sender.poll("t").status.is_terminal:
            pass
        assert sender.poll("t").status is TransferStatus.DONE
        expected = torch.arange(n * width, dtype=torch.float32).view(n, width)
        got_k = gather_tokens(receiver.k_cache[0], list(range(16)), 0, n)
        got_v = gather_tokens(receiver.v_cache[0], list(range(16)), 0, n)
        assert torch.equal(got_k, expected[:, :128].reshape(n, 2, 64))
        assert torch.equal(got_v, expected[:, 128:].reshape(n, 2, 64))
    finally:
        sender.close()
        receiver.close()
