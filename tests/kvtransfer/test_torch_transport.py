"""What only the torch.distributed transport has: a payload stream beside the control
stream that must stay aligned, per-pair process groups that are bounded, and a payload
that may never come, and a rendezvous that travels only on the authenticated connection: a
receiver opens no port for it, answers it only after the handshake, keeps each pair's apart,
and a receiver that accepts but fails the rendezvous fails the transfer at once."""

from __future__ import annotations

import multiprocessing
import threading
import time

import psutil
import torch
import zmq
from curve_helpers import insider_socket
from kv_helpers import (
    SPEC,
    caches,
    make_receiver,
    make_sender,
    send_layers,
    transfer_in_child,
    wait_for,
)

from pdserve.deploy.spec import make_curve_keys
from pdserve.kvtransfer.base import TransferStatus
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.messages import (
    NO_HANDSHAKE,
    Handshake,
    HandshakeReply,
    StoreReply,
    StoreRequest,
    decode,
    encode,
)
from pdserve.kvtransfer.pair_store import StoreOp
from pdserve.kvtransfer.torch_channel import TorchSenderChannel

KEYS = make_curve_keys()


class CorruptingChannel(TorchSenderChannel):
    """Flips one payload bit after hashing, for transfers whose id starts with 'bad'."""

    def ship(self, endpoint, sock, frame):
        if frame.header.transfer_id.startswith("bad"):
            frame.payload.numpy()[5] ^= 0x01
        super().ship(endpoint, sock, frame)


class PayloadLosingChannel(TorchSenderChannel):
    """Sends chunk headers but never their payloads: a sender that died in between."""

    def ship(self, endpoint, sock, frame):
        sock.send(encode(frame.header))


def torch_sender(**channel_kw):
    return make_sender("torch", channel=TorchSenderChannel(**channel_kw))


def channel_threads(name: str) -> int:
    return sum(t.name == name and t.is_alive() for t in threading.enumerate())


def transfer(sender, receiver, tid, p_cache, d_blocks, n=8):
    receiver.expect(tid, d_blocks, n, lease_s=5)
    sender.begin(tid, receiver.endpoint, n)
    send_layers(sender, tid, p_cache, [0, 1], n)
    sender.finish(tid, 5)
    return wait_for(lambda: sender.poll(tid), timeout=8)


def test_a_rejected_payload_is_drained_and_the_pair_carries_on():
    torch.manual_seed(0)
    p_cache = caches(32, 4, fill=True)
    receiver = make_receiver("torch", caches(32, 8), timeout_s=5)
    sender = make_sender("torch", channel=CorruptingChannel(timeout_s=5))
    try:
        bad = transfer(sender, receiver, "bad", p_cache, [0])
        assert "checksum mismatch" in bad.reason
        good = transfer(sender, receiver, "good", p_cache, [1])
        assert good.status is TransferStatus.DONE
        for layer in range(SPEC.num_layers):
            assert torch.equal(gather_tokens(receiver.k_cache[layer], [1], 0, 8),
                               gather_tokens(p_cache[0][layer], [0, 1], 0, 8))
    finally:
        sender.close()
        receiver.close()


def test_groups_are_bounded_and_rebuilt_on_demand():
    torch.manual_seed(0)
    p_cache = caches(32, 4, fill=True)
    receivers = [make_receiver("torch", caches(8, 8), timeout_s=5) for _ in range(3)]
    sender = torch_sender(timeout_s=5, max_pairs=1)
    try:
        for i, r in enumerate(receivers * 2):  # back to the first after the others
            assert transfer(sender, r, f"t{i}", p_cache, [i % 8]).status is TransferStatus.DONE
            sender.release(f"t{i}")
        time.sleep(0.1)  # evictions happen on the I/O thread's next turn
        assert channel_threads("kv-send-channel") <= 1
    finally:
        sender.close()
        for r in receivers:
            r.close()
    deadline = time.monotonic() + 3
    while channel_threads("kv-send-channel") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert channel_threads("kv-send-channel") == 0


def test_a_payload_that_never_comes_fails_by_deadline_and_frees_the_receiver():
    torch.manual_seed(0)
    p_cache = caches(32, 4, fill=True)
    receiver = make_receiver("torch", caches(32, 8), timeout_s=1.5)
    lost = make_sender("torch", channel=PayloadLosingChannel(timeout_s=1.5), ack_timeout_s=1.0)
    try:
        receiver.expect("lost", [0], 8, lease_s=0.5)
        lost.begin("lost", receiver.endpoint, 8)
        send_layers(lost, "lost", p_cache, [0, 1], 8, layers=[0])
        assert "lease expired" in wait_for(lambda: receiver.poll("lost"), timeout=3).reason
        lost.finish("lost", 1)
        assert wait_for(lambda: lost.poll("lost"), timeout=5).status is TransferStatus.FAILED
    finally:
        lost.close()
    # the dead pair does not stop a healthy sender
    healthy = torch_sender(timeout_s=5)
    try:
        assert transfer(healthy, receiver, "ok", p_cache, [2]).status is TransferStatus.DONE
    finally:
        healthy.close()
        receiver.close()


def test_a_sender_whose_pair_the_receiver_evicted_reconnects():
    torch.manual_seed(0)
    p_cache = caches(32, 4, fill=True)
    receiver = make_receiver("torch", caches(32, 8), timeout_s=3, max_pairs=1)
    a, b = torch_sender(timeout_s=3), torch_sender(timeout_s=3)
    try:
        assert transfer(a, receiver, "a1", p_cache, [0]).status is TransferStatus.DONE
        assert transfer(b, receiver, "b1", p_cache, [1]).status is TransferStatus.DONE  # evicts a
        evicted = transfer(a, receiver, "a2", p_cache, [2])
        assert evicted.status is TransferStatus.FAILED
        # either the control path (no handshake) or the closed gloo pair reports it first
        assert any(why in evicted.reason for why in
                   ("forgot this sender", "no handshake", "payload channel failed"))
        receiver.release("a2")
        assert transfer(a, receiver, "a3", p_cache, [3]).status is TransferStatus.DONE
    finally:
        a.close()
        b.close()
        receiver.close()


def test_a_receiver_that_refuses_the_rendezvous_fails_the_transfer():
    """A hand-driven ZMQ peer accepts the handshake, then refuses the first store request."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sender = torch_sender(timeout_s=60)
    try:
        sender.begin("t", f"tcp://127.0.0.1:{port}", 4)
        peer, frame = sock.recv_multipart()
        assert isinstance(decode(frame), Handshake)
        sock.send_multipart([peer, encode(HandshakeReply(True))])
        peer, frame = sock.recv_multipart()
        request = decode(frame)
        assert isinstance(request, StoreRequest) and request.op == StoreOp.SET
        sock.send_multipart([peer, encode(StoreReply(request.seq, False, reason="no store"))])
        result = wait_for(lambda: sender.poll("t"), timeout=10)  # well before the 60 s
        assert "no store" in result.reason
    finally:
        sender.close()
        sock.close()


def _listening_ports() -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def test_the_rendezvous_travels_only_on_the_authenticated_connection(p_cache):
    before = _listening_ports()
    receiver = make_receiver("torch", caches(32, 8), curve=KEYS)
    sender = make_sender("torch", curve=KEYS)
    intruder = insider_socket(zmq.DEALER, KEYS)
    intruder.setsockopt(zmq.RCVTIMEO, 10_000)  # bounds a failure, never waited out
    try:
        # no store port: the receiver listens on its ZMQ endpoint alone until a pair forms
        assert _listening_ports() - before == {int(receiver.endpoint.rpartition(":")[2])}
        intruder.connect(receiver.endpoint)
        intruder.send(encode(StoreRequest(1, StoreOp.CHECK, "0/0")))
        assert decode(intruder.recv()).reason == NO_HANDSHAKE
        receiver.expect("t", [3, 4], 8, lease_s=5)
        sender.begin("t", receiver.endpoint, 8)
        send_layers(sender, "t", p_cache, [1, 2], 8)
        sender.finish("t", 7)
        assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
        # a member of the cluster that handshakes gets a store of its own: the sender's
        # rendezvous keys (rank 0 set "0/0") are not in it, and what it writes stays there
        intruder.send(encode(SPEC.handshake("torch")))
        assert decode(intruder.recv()).accepted
        intruder.send(encode(StoreRequest(2, StoreOp.CHECK, "0/0")))
        assert decode(intruder.recv()) == StoreReply(2, True, b"0")
        intruder.send(encode(StoreRequest(3, StoreOp.SET, "0/1", b"forged")))
        assert decode(intruder.recv()).ok
        receiver.expect("u", [5, 6], 8, lease_s=5)
        sender.begin("u", receiver.endpoint, 8)
        send_layers(sender, "u", p_cache, [1, 2], 8)
        sender.finish("u", 7)
        assert wait_for(lambda: sender.poll("u")).status is TransferStatus.DONE
    finally:
        intruder.close()
        sender.close()
        receiver.close()


def test_a_closed_side_lets_its_process_exit_cleanly():
    """gloo aborts a process that exits with a group still alive ("terminate called without
    an active exception"): close() waits for its pairs' groups to go."""
    spawn = multiprocessing.get_context("spawn")
    receiver = make_receiver("torch", caches(4, 4))
    sender = make_sender("torch")
    try:
        receiver.expect("t", [0], 4, lease_s=30)
        conn, child_conn = spawn.Pipe()
        child = spawn.Process(target=transfer_in_child,
                              args=("sender", receiver.endpoint, child_conn))
        child.start()
        assert conn.recv() == "done"
        child.join(30)
        assert child.exitcode == 0

        conn, child_conn = spawn.Pipe()
        child = spawn.Process(target=transfer_in_child, args=("receiver", None, child_conn))
        child.start()
        endpoint = conn.recv()
        sender.begin("t", endpoint, 4)
        send_layers(sender, "t", caches(4, 4, fill=True), [0], 4)
        sender.finish("t", 1)
        assert wait_for(lambda: sender.poll("t"), timeout=10).status is TransferStatus.DONE
        assert conn.recv() == "done"
        child.join(30)
        assert child.exitcode == 0
    finally:
        sender.close()
        receiver.close()
