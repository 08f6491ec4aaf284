"""The KV transfer with the cluster's CURVE keys, on real loopback sockets: transfers
complete as without them, a peer without the cluster's client key never gets past the ZMTP
handshake, and a peer with it cannot touch a transfer that another connection owns."""

from __future__ import annotations

import pytest
import torch
import zmq
from curve_helpers import OUTSIDERS, connect_and_judge, insider_socket, outsider_socket
from helpers import wait_for as wait_until
from kv_helpers import SPEC, caches, make_receiver, make_sender, send_layers, wait_for

from pdserve.deploy.spec import make_curve_keys
from pdserve.kvtransfer.base import TransferStatus
from pdserve.kvtransfer.frames import stage_frames
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.messages import (
    FOREIGN_TRANSFER,
    Abort,
    Done,
    KeepAlive,
    decode,
    encode,
)

KEYS = make_curve_keys()


@pytest.fixture(params=["zmq", "torch"])
def kind(request):
    return request.param


def _complete(sender, receiver, p_cache, p_blocks, d_blocks, n, layers=None):
    """Send `layers` (all by default) and finish; the transfer must end DONE on both sides
    with exactly the sender's KV in `d_blocks`."""
    send_layers(sender, "t", p_cache, p_blocks, n, layers)
    sender.finish("t", 7)
    assert wait_for(lambda: sender.poll("t")).first_token_id == 7
    assert receiver.poll("t").status is TransferStatus.DONE
    for layer in range(SPEC.num_layers):
        for src, dst in zip(p_cache, (receiver.k_cache, receiver.v_cache), strict=True):
            assert torch.equal(gather_tokens(dst[layer], d_blocks, 0, n),
                               gather_tokens(src[layer], p_blocks, 0, n))


@pytest.mark.parametrize("how", OUTSIDERS)
def test_an_outsider_never_gets_past_the_handshake(kind, p_cache, how):
    receiver = make_receiver(kind, caches(32, 8), curve=KEYS)
    sender = make_sender(kind, curve=KEYS)
    outsider = outsider_socket(zmq.DEALER, how, KEYS)
    try:
        n, p_blocks, d_blocks = 8, [1, 2], [3, 4]
        receiver.expect("t", d_blocks, n, lease_s=5)
        # what it sends is queued before the verdict, and never read
        frame = next(stage_frames("t", 0, 0, torch.zeros(n, 2, 8), torch.zeros(n, 2, 8),
                                  1 << 20))
        messages = [[encode(SPEC.handshake(receiver.channel.transport))],
                    [encode(frame.header), frame.payload.numpy().tobytes()],
                    [encode(Abort("t", "forged"))]]
        assert connect_and_judge(outsider, receiver.endpoint, messages) in (
            zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        assert receiver.poll("t").status is TransferStatus.PENDING
        sender.begin("t", receiver.endpoint, n)
        _complete(sender, receiver, p_cache, p_blocks, d_blocks, n)
    finally:
        outsider.close()
        sender.close()
        receiver.close()


def test_a_sender_without_the_clusters_keys_fails_at_once(kind):
    receiver = make_receiver(kind, caches(4, 4), curve=KEYS)
    sender = make_sender(kind, curve=make_curve_keys(), handshake_timeout_s=60.0)
    try:
        receiver.expect("t", [0], 4, lease_s=60)
        sender.begin("t", receiver.endpoint, 4)
        result = wait_for(lambda: sender.poll("t"), timeout=30)  # well before 60 s
        assert "refused the connection" in result.reason
        assert receiver.poll("t").status is TransferStatus.PENDING
    finally:
        sender.close()
        receiver.close()


def test_a_peer_with_the_keys_cannot_touch_another_connections_transfer(kind, p_cache):
    receiver = make_receiver(kind, caches(32, 8), curve=KEYS)
    sender = make_sender(kind, curve=KEYS)
    intruder = insider_socket(zmq.DEALER, KEYS)
    intruder.setsockopt(zmq.RCVTIMEO, 10_000)  # bounds a failure, never waited out
    try:
        n, p_blocks, d_blocks = 8, [1, 2], [3, 4]
        receiver.expect("t", d_blocks, n, lease_s=5)
        sender.begin("t", receiver.endpoint, n)
        send_layers(sender, "t", p_cache, p_blocks, n, layers=[0])  # "t" is its connection's
        wait_until(lambda: receiver.poll("t").status is TransferStatus.TRANSFERRING, 10,
                   "the sender's first frame")
        intruder.connect(receiver.endpoint)
        intruder.send(encode(SPEC.handshake(receiver.channel.transport)))
        assert decode(intruder.recv()).accepted  # a member of the cluster: heard
        # layer 1 forged (the sender has not sent it yet), a keep-alive, a Done, an Abort
        pk, pv = p_cache
        forged = next(stage_frames("t", 1, 0, -pk[1, 1, :n], -pv[1, 1, :n], 1 << 20))
        intruder.send_multipart([encode(forged.header), forged.payload.numpy().tobytes()])
        for msg in (KeepAlive("t"), Done("t", n, 99), Abort("t", "forged")):
            intruder.send(encode(msg))
        for _ in range(4):
            assert decode(intruder.recv()).reason == FOREIGN_TRANSFER
        assert receiver.poll("t").status is TransferStatus.TRANSFERRING
        _complete(sender, receiver, p_cache, p_blocks, d_blocks, n, range(1, SPEC.num_layers))
    finally:
        intruder.close()
        sender.close()
        receiver.close()
