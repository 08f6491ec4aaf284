"""The ZeroMQ and torch.distributed (gloo) transports on real loopback sockets, and the
in-process fake where a test does not need sockets: transfers, refusals, vanished peers,
corrupt frames and deadlines all end in a defined state, in bounded time. Every test runs
against every transport it applies to."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq
from kv_helpers import KINDS, SPEC, caches, make_receiver, make_sender, send_layers, wait_for

from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.frames import stage_frames
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.messages import HandshakeReply, decode, encode

SOCKETS = ["zmq", "torch"]  # the kinds with a control plane on ZMQ sockets


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def receiver(kind):
    r = make_receiver(kind, caches(32, 8))
    yield r
    r.close()


@pytest.fixture
def sender(kind):
    s = make_sender(kind, handshake_timeout_s=1.0, ack_timeout_s=1.0)
    yield s
    s.close()


@pytest.mark.parametrize("bind,frame_bytes", [
    ("tcp://127.0.0.1:*", 1 << 20),
    ("ipc", 1 << 20),
    ("tcp://127.0.0.1:*", 300),  # 128 bytes per token: layers split into 2-token frames
])
def test_complete_transfer(kind, p_cache, bind, frame_bytes, tmp_path):
    if bind == "ipc":
        if kind == "inproc":
            pytest.skip("the in-process fake binds nothing")
        bind = f"ipc://{tmp_path}/kv.sock"
    receiver = make_receiver(kind, caches(32, 8), bind=bind)
    sender = make_sender(kind, max_frame_bytes=frame_bytes)
    try:
        n, p_blocks, d_blocks = 13, [7, 2, 9, 4], [3, 5]
        receiver.expect("t", d_blocks, n, lease_s=5)
        sender.begin("t", receiver.endpoint, n)
        send_layers(sender, "t", p_cache, p_blocks, n)
        sender.finish("t", 42, note=b"prefill stamps")
        assert wait_for(lambda: sender.poll("t")).first_token_id == 42
        result = receiver.poll("t")
        assert result.status is TransferStatus.DONE and result.first_token_id == 42
        assert result.note == b"prefill stamps"
        for layer in range(SPEC.num_layers):
            for src, dst in zip(p_cache, (receiver.k_cache, receiver.v_cache), strict=True):
                assert torch.equal(gather_tokens(dst[layer], d_blocks, 0, n),
                                   gather_tokens(src[layer], p_blocks, 0, n))
    finally:
        sender.close()
        receiver.close()


def test_the_hand_off_note_reaches_the_receivers_done_result(kind, receiver, sender, p_cache):
    note = bytes(range(256)) * 4  # opaque: any bytes, zeros included
    receiver.expect("t", [0], 4, lease_s=5)
    sender.begin("t", receiver.endpoint, 4)
    assert receiver.poll("t").note == b""
    send_layers(sender, "t", p_cache, [0], 4)
    sender.finish("t", 8, note=note)
    assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
    result = receiver.poll("t")
    assert (result.status, result.first_token_id, result.note) == (TransferStatus.DONE, 8, note)
    # a transfer that fails carries none
    receiver.expect("u", [1], 4, lease_s=5)
    sender.begin("u", receiver.endpoint, 4)
    send_layers(sender, "u", p_cache, [1], 4, layers=[0])
    sender.finish("u", 9, note=b"stamps")
    assert wait_for(lambda: sender.poll("u")).reason == "layer 1 is missing tokens"
    assert receiver.poll("u").note == b""


def test_handshake_mismatch_is_refused_at_connect(kind, receiver):
    other = make_sender(kind, KVSpec("tiny", 4, 2, 8, torch.float32))
    try:
        receiver.expect("t", [0], 4, lease_s=5)
        other.begin("t", receiver.endpoint, 4)
        result = wait_for(lambda: other.poll("t"), timeout=2)
        assert result.reason == "handshake refused: num_layers differs: 3 here, 4 at the peer"
    finally:
        other.close()


def test_no_receiver_fails_within_the_handshake_timeout(kind, sender, p_cache):
    sender.begin("t", "tcp://127.0.0.1:1", 4)  # nothing listens there
    send_layers(sender, "t", p_cache, [0], 4, layers=[0])
    result = wait_for(lambda: sender.poll("t"), timeout=30)  # the timeout is 1 s
    expected = "no receiver at" if kind == "inproc" else "no handshake reply"
    assert expected in result.reason


def test_wait_blocks_until_the_verdict_and_no_longer(kind, sender, receiver, p_cache):
    receiver.expect("ok", [0], 4, lease_s=5)
    sender.begin("ok", receiver.endpoint, 4)
    send_layers(sender, "ok", p_cache, [0], 4)
    receiver.expect("open", [1], 4, lease_s=5)
    sender.begin("open", receiver.endpoint, 4)
    send_layers(sender, "open", p_cache, [0], 4, layers=[0])
    sender.finish("ok", 7)
    assert sender.wait("ok", 30).status is TransferStatus.DONE
    # not finished: the timeout ends the wait, the transfer stays live
    assert not sender.wait("open", 0.05).status.is_terminal
    assert sender.wait("never-begun", 0.05).reason == "unknown transfer"
    # a failure recorded by the I/O thread (here: no handshake within 1 s) ends a wait too
    sender.begin("lost", "tcp://127.0.0.1:1", 4)
    assert sender.wait("lost", 30).status is TransferStatus.FAILED
    sender.abort("open", "test over")


def test_an_endpoint_that_cannot_be_connected_fails_at_once(kind, sender, receiver, p_cache):
    sender.begin("bad", "no-such-scheme://nowhere", 4)
    expected = "no receiver at" if kind == "inproc" else "cannot connect to"
    assert expected in wait_for(lambda: sender.poll("bad"), timeout=2).reason
    receiver.expect("t", [0], 4, lease_s=5)  # and the sender carries on
    sender.begin("t", receiver.endpoint, 4)
    send_layers(sender, "t", p_cache, [0], 4)
    sender.finish("t", 1)
    assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE


@pytest.mark.parametrize("kind", SOCKETS)
def test_a_sender_of_the_other_transport_is_refused(kind, receiver):
    other = make_sender("zmq" if kind == "torch" else "torch")
    try:
        receiver.expect("t", [0], 4, lease_s=5)
        other.begin("t", receiver.endpoint, 4)
        reason = wait_for(lambda: other.poll("t"), timeout=2).reason
        assert reason.startswith("handshake refused: transport differs")
    finally:
        other.close()


def test_receiver_vanishing_mid_transfer_fails_the_sender(kind, sender, p_cache):
    receiver = make_receiver(kind, caches(32, 8))
    receiver.expect("t", [0, 1], 8, lease_s=5)
    sender.begin("t", receiver.endpoint, 8)
    send_layers(sender, "t", p_cache, [0, 1], 8, layers=[0])
    time.sleep(0.1)
    receiver.close()
    send_layers(sender, "t", p_cache, [0, 1], 8, layers=[1, 2])
    sender.finish("t", 1)
    # The dropped connection fails the transfer well before the ack timeout (10 s);
    # torch: the payload channel may notice first; inproc: the next frame finds none.
    result = wait_for(lambda: sender.poll("t"), timeout=3)
    assert (result.reason.endswith("disconnected")
            or kind == "torch" and "payload channel failed" in result.reason
            or kind == "inproc" and result.reason.endswith("is gone")), result.reason
    assert receiver.poll("t").reason == "receiver closed"


def test_unknown_transfer_missing_layer_and_deadline(receiver, sender, p_cache):
    sender.begin("ghost", receiver.endpoint, 4)
    send_layers(sender, "ghost", p_cache, [0], 4, layers=[0])
    assert "does not expect transfer 'ghost'" in wait_for(lambda: sender.poll("ghost")).reason

    receiver.expect("partial", [0], 4, lease_s=5)
    sender.begin("partial", receiver.endpoint, 4)
    send_layers(sender, "partial", p_cache, [1], 4, layers=[0, 1])
    sender.finish("partial", 7)
    assert wait_for(lambda: sender.poll("partial")).reason == "layer 2 is missing tokens"

    receiver.expect("late", [1], 4, lease_s=0.05)
    time.sleep(0.15)
    assert receiver.poll("late").reason .startswith("lease expired")
    sender.begin("late", receiver.endpoint, 4)
    send_layers(sender, "late", p_cache, [2], 4, layers=[0])
    assert "lease expired" in wait_for(lambda: sender.poll("late")).reason


def _keeping_alive(kind):
    """A sender of `kind` that renews leases every 50 ms (the in-process one on each poll)."""
    if kind == "inproc":
        return make_sender(kind)
    return make_sender(kind, handshake_timeout_s=1.0, ack_timeout_s=1.0, keepalive_s=0.05)


def test_a_lease_measures_the_senders_silence_not_its_queue(kind, receiver, p_cache):
    """A transfer whose job waits (no frame yet) outlives many leases while its sender keeps
    it alive, then completes; the same wait with a silent sender expires."""
    sender = _keeping_alive(kind)
    try:
        receiver.expect("queued", [0], 4, lease_s=0.3)
        sender.begin("queued", receiver.endpoint, 4)
        end = time.monotonic() + 1.5  # five leases, no frame
        while time.monotonic() < end:
            assert not sender.poll("queued").status.is_terminal  # the owner's polling
            assert not receiver.poll("queued").status.is_terminal
            time.sleep(0.02)
        send_layers(sender, "queued", p_cache, [0], 4)
        sender.finish("queued", 9)
        assert wait_for(lambda: sender.poll("queued")).status is TransferStatus.DONE
        assert receiver.poll("queued").status is TransferStatus.DONE
    finally:
        sender.close()
    silent = make_sender(kind, keepalive_s=60.0) if kind != "inproc" else None
    if silent is not None:  # the in-process pair has no silence but its owner's
        try:
            receiver.expect("silent", [1], 4, lease_s=0.3)
            silent.begin("silent", receiver.endpoint, 4)
            assert wait_for(lambda: receiver.poll("silent")).reason.startswith("lease expired")
        finally:
            silent.close()


def test_a_keep_alive_for_an_ended_reservation_fails_the_job_before_it_sends(kind, receiver):
    """The decode side released the reservation (aborted, or its lease ran out) while the
    job waited: the sender learns it from the keep-alive's answer, with no frame sent."""
    sender = _keeping_alive(kind)
    try:
        receiver.expect("gone", [0], 4, lease_s=5)
        sender.begin("gone", receiver.endpoint, 4)
        receiver.release("gone")
        result = wait_for(lambda: sender.poll("gone"))
        assert result.status is TransferStatus.FAILED
        assert "does not expect transfer 'gone'" in result.reason
    finally:
        sender.close()


def test_corrupt_and_duplicate_frames_are_rejected(p_cache):
    """A hand-driven ZMQ peer sends frames no correct sender would."""
    receiver = make_receiver("zmq", caches(32, 8))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(receiver.endpoint)
    try:
        sock.send(encode(SPEC.handshake()))
        assert decode(sock.recv()) == HandshakeReply(True)
        pk, pv = p_cache
        for tid in ("corrupt", "dup"):
            receiver.expect(tid, [0], 4, lease_s=5)
            frame = next(stage_frames(tid, 0, 0, pk[0, 0], pv[0, 0], 1 << 20))
            header, payload = frame.header, frame.payload.numpy().tobytes()
            if tid == "corrupt":
                bad = bytearray(payload)
                bad[7] ^= 0x10
                sock.send_multipart([encode(header), bytes(bad)])
            else:
                sock.send_multipart([encode(header), payload])
                sock.send_multipart([encode(header), payload])
            reply = decode(sock.recv())
            assert not reply.ok and reply.transfer_id == tid
        assert "checksum mismatch" in receiver.poll("corrupt").reason
        assert "duplicate tokens" in receiver.poll("dup").reason
        # a peer without a handshake is refused
        stranger = zmq.Context.instance().socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.setsockopt(zmq.RCVTIMEO, 3000)
        stranger.connect(receiver.endpoint)
        stranger.send_multipart([encode(header), payload])
        assert decode(stranger.recv()).reason == "no handshake from this sender"
        stranger.close()
    finally:
        sock.close()
        receiver.close()


def test_abort_reaches_the_receiver(receiver, sender, p_cache):
    receiver.expect("t", [0, 1], 8, lease_s=5)
    sender.begin("t", receiver.endpoint, 8)
    send_layers(sender, "t", p_cache, [0, 1], 8, layers=[0])
    sender.abort("t", "client cancelled")
    assert wait_for(lambda: receiver.poll("t")).reason == "client cancelled"
    sender.abort("t", "again")
    assert sender.poll("t").reason == "client cancelled"


def test_64_concurrent_transfers(kind, p_cache):
    receiver = make_receiver(kind, caches(64, 8))
    senders = [make_sender(kind) for _ in range(4)]
    n, ids = 6, list(range(64))  # one destination block each
    try:
        for i in ids:
            receiver.expect(f"t{i}", [i], n, lease_s=20)

        def run(sender, mine):
            for i in mine:
                sender.begin(f"t{i}", receiver.endpoint, n)
            for layer in range(SPEC.num_layers):  # interleaved across transfers
                for i in mine:
                    pk, pv = p_cache
                    blocks = [i % 30, i % 30 + 1]
                    sender.send_layer(f"t{i}", layer, 0, gather_tokens(pk[layer], blocks, 0, n),
                                      gather_tokens(pv[layer], blocks, 0, n))
            for i in mine:
                sender.finish(f"t{i}", i)

        threads = [threading.Thread(target=run, args=(s, ids[j::4]))
                   for j, s in enumerate(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for j, s in enumerate(senders):
            for i in ids[j::4]:
                assert wait_for(lambda s=s, i=i: s.poll(f"t{i}")).first_token_id == i
        for i in ids:
            blocks = [i % 30, i % 30 + 1]
            for layer in range(SPEC.num_layers):
                assert torch.equal(gather_tokens(receiver.v_cache[layer], [i], 0, n),
                                   gather_tokens(p_cache[1][layer], blocks, 0, n))
    finally:
        for s in senders:
            s.close()
        receiver.close()


def test_release_after_done_and_while_live(receiver, sender, p_cache):
    receiver.expect("done", [0], 4, lease_s=5)
    sender.begin("done", receiver.endpoint, 4)
    send_layers(sender, "done", p_cache, [0], 4)
    sender.finish("done", 3)
    assert wait_for(lambda: sender.poll("done")).status is TransferStatus.DONE
    sender.release("done")
    receiver.release("done")
    assert sender.poll("done").reason == receiver.poll("done").reason == "unknown transfer"

    receiver.expect("live", [1], 4, lease_s=5)
    sender.begin("live", receiver.endpoint, 4)
    send_layers(sender, "live", p_cache, [1], 4, layers=[0])
    sender.release("live")
    assert wait_for(lambda: receiver.poll("live")).reason == "released"


@pytest.mark.parametrize("kind", SOCKETS)
def test_a_restarted_receiver_fails_the_old_connection_then_accepts_a_new_one(
        kind, sender, p_cache, tmp_path):
    bind = f"ipc://{tmp_path}/kv.sock"
    first = make_receiver(kind, caches(32, 8), bind=bind)
    first.expect("a", [0], 4, lease_s=5)
    sender.begin("a", first.endpoint, 4)
    send_layers(sender, "a", p_cache, [0], 4)
    sender.finish("a", 1)
    assert wait_for(lambda: sender.poll("a")).status is TransferStatus.DONE
    first.close()
    second = make_receiver(kind, caches(32, 8), bind=bind)  # same endpoint, new process state
    try:
        second.expect("b", [0], 4, lease_s=5)
        sender.begin("b", second.endpoint, 4)
        send_layers(sender, "b", p_cache, [0], 4)
        sender.finish("b", 2)
        result = wait_for(lambda: sender.poll("b"), timeout=8)
        # the old connection may or may not have reached the new receiver before it failed
        if result.status is TransferStatus.FAILED:
            # torch: the old pair's gloo connection may report the restart first
            assert ("forgot this sender" in result.reason or "no handshake" in result.reason
                    or result.reason.endswith("disconnected")
                    or kind == "torch" and "payload channel failed" in result.reason)
            second.release("b")
            second.expect("c", [1], 4, lease_s=5)
            sender.begin("c", second.endpoint, 4)
            send_layers(sender, "c", p_cache, [1], 4)
            sender.finish("c", 3)
            assert wait_for(lambda: sender.poll("c"), timeout=8).status is TransferStatus.DONE
    finally:
        second.close()
