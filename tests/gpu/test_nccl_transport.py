"""The torch transport over NCCL between two GPUs of this machine (skips elsewhere)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kvtransfer.base import KVSpec, TransferStatus
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
        receiver.expect("t", [0, 1, 2], n, timeout_s=30)
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
