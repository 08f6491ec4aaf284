"""Transfer lifecycle through the in-process fake: the checks every transport shares
(kvtransfer.assembly) and the failure paths, each ending in a defined state."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdserve.kvtransfer.base import KVSpec, TransferStatus
from pdserve.kvtransfer.inproc import InProcHub, InProcReceiver, InProcSender
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.transports import TransportKind, make_receiver, make_sender

SPEC = KVSpec("tiny", num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
P_BS, D_BS = 4, 8


def caches(num_blocks, block_size, fill=False):
    shape = (SPEC.num_layers, num_blocks, block_size, SPEC.num_kv_heads, SPEC.head_dim)
    make = torch.randn if fill else torch.zeros
    return make(shape), make(shape)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    hub = InProcHub()
    dk, dv = caches(64, D_BS)
    receiver = InProcReceiver(hub, SPEC, dk, dv)
    sender = InProcSender(hub, SPEC)
    pk, pv = caches(64, P_BS, fill=True)
    return hub, receiver, sender, (pk, pv), (dk, dv)


def send_all(sender, tid, p_cache, p_blocks, n, chunks=((0, 5), (5, None))):
    pk, pv = p_cache
    for layer in range(SPEC.num_layers):
        for start, end in chunks:
            end = n if end is None else end
            sender.send_layer(tid, layer, start, gather_tokens(pk[layer], p_blocks, start, end),
                              gather_tokens(pv[layer], p_blocks, start, end))


def assert_same_kv(p_cache, p_blocks, d_cache, d_blocks, n):
    for layer in range(SPEC.num_layers):
        for src, dst in zip(p_cache, d_cache, strict=True):
            torch.testing.assert_close(gather_tokens(dst[layer], d_blocks, 0, n),
                                       gather_tokens(src[layer], p_blocks, 0, n), rtol=0, atol=0)


def test_complete_transfer_between_block_sizes(setup):
    hub, receiver, sender, p_cache, d_cache = setup
    n, p_blocks, d_blocks = 13, [7, 2, 9, 4], [3, 5]
    receiver.expect("t", d_blocks, n, lease_s=5)
    assert receiver.poll("t").status is TransferStatus.PENDING
    sender.begin("t", receiver.endpoint, n)
    send_all(sender, "t", p_cache, p_blocks, n)
    assert receiver.poll("t").status is TransferStatus.TRANSFERRING
    sender.finish("t", first_token_id=42)
    for side in (sender, receiver):
        result = side.poll("t")
        assert result.status is TransferStatus.DONE and result.first_token_id == 42
    assert_same_kv(p_cache, p_blocks, d_cache, d_blocks, n)
    receiver.release("t")
    assert receiver.poll("t").reason == "unknown transfer"


def test_expect_refuses_blocks_that_cannot_hold_the_tokens(setup):
    _, receiver, _, _, _ = setup
    with pytest.raises(ValueError, match="17 tokens do not fit in 2 blocks of 8"):
        receiver.expect("t", [0, 1], 17, lease_s=5)
    with pytest.raises(ValueError, match=r"block ids outside \[0, 64\)"):
        receiver.expect("t", [64], 4, lease_s=5)
    assert receiver.poll("t").reason == "unknown transfer"


def test_handshake_mismatch_is_refused(setup):
    hub, receiver, _, _, _ = setup
    other = InProcSender(hub, KVSpec("tiny", 3, 2, 8, torch.bfloat16))
    receiver.expect("t", [0], 4, lease_s=5)
    other.begin("t", receiver.endpoint, 4)
    result = other.poll("t")
    assert result.status is TransferStatus.FAILED
    assert result.reason == ("handshake refused: dtype differs: 'float32' here, "
                             "'bfloat16' at the peer")


@pytest.mark.parametrize("fault", ["corrupt", "duplicate", "missing_layer", "unknown",
                                   "bad_range"])
def test_bad_frames_fail_the_transfer(setup, fault):
    hub, receiver, sender, p_cache, d_cache = setup
    n, p_blocks, d_blocks = 8, [1, 2], [0]
    receiver.expect("t", d_blocks, n, lease_s=5)
    tid = "other" if fault == "unknown" else "t"
    sender.begin(tid, receiver.endpoint, n)
    pk, pv = p_cache
    k, v = gather_tokens(pk[0], p_blocks, 0, n), gather_tokens(pv[0], p_blocks, 0, n)
    if fault == "corrupt":
        hub.corrupt_next("t", 0)
    if fault == "bad_range":
        sender.send_layer(tid, 0, 4, k, v)  # 8 tokens at position 4 overrun the 8 reserved
    else:
        sender.send_layer(tid, 0, 0, k, v)
    if fault == "duplicate":
        sender.send_layer(tid, 0, 0, k[:2], v[:2])
    if fault == "missing_layer":
        sender.finish(tid, 1)
    expected = {"corrupt": "checksum mismatch", "duplicate": "duplicate tokens",
                "missing_layer": "layer 1 is missing tokens",
                "unknown": "does not expect transfer 'other'",
                "bad_range": "token range [4, 12) outside"}[fault]
    assert sender.poll(tid).status is TransferStatus.FAILED
    assert expected in sender.poll(tid).reason
    if fault != "unknown":
        assert receiver.poll("t").status is TransferStatus.FAILED
    # a failed transfer takes no more frames and never becomes DONE
    sender.send_layer(tid, 1, 0, k, v)
    sender.finish(tid, 1)
    assert sender.poll(tid).status is TransferStatus.FAILED


def test_deadline_fails_a_transfer_whose_data_is_late(setup):
    _, receiver, sender, p_cache, _ = setup
    receiver.expect("t", [0], 4, lease_s=0.05)
    sender.begin("t", receiver.endpoint, 4)
    time.sleep(0.1)
    assert receiver.poll("t").reason .startswith("lease expired")
    pk, pv = p_cache
    sender.send_layer("t", 0, 0, pk[0, 0], pv[0, 0])
    assert sender.poll("t").status is TransferStatus.FAILED


def test_vanished_receiver_and_abort(setup):
    hub, receiver, sender, p_cache, _ = setup
    pk, pv = p_cache
    receiver.expect("a", [0], 4, lease_s=5)
    receiver.expect("b", [1], 4, lease_s=5)
    sender.begin("a", receiver.endpoint, 4)
    sender.begin("b", receiver.endpoint, 4)
    sender.abort("a", "client cancelled")
    assert receiver.poll("a").reason == "client cancelled"
    sender.abort("a", "again")  # idempotent
    assert sender.poll("a").reason == "client cancelled"
    receiver.close()
    sender.send_layer("b", 0, 0, pk[0, 0], pv[0, 0])
    assert "is gone" in sender.poll("b").reason
    assert receiver.poll("b").reason == "receiver closed"
    with pytest.raises(ValueError, match="never begun"):
        sender.send_layer("nope", 0, 0, pk[0, 0], pv[0, 0])


def test_64_concurrent_transfers_interleave(setup):
    _, receiver, sender, p_cache, d_cache = setup
    n = 6  # one destination block each
    for i in range(64):
        receiver.expect(f"t{i}", [i], n, lease_s=10)
        sender.begin(f"t{i}", receiver.endpoint, n)

    def run(ids):
        for layer in range(SPEC.num_layers):
            for i in ids:
                p_blocks = [i % 60, i % 60 + 1]
                pk, pv = p_cache
                sender.send_layer(f"t{i}", layer, 0, gather_tokens(pk[layer], p_blocks, 0, n),
                                  gather_tokens(pv[layer], p_blocks, 0, n))
        for i in ids:
            sender.finish(f"t{i}", i)

    threads = [threading.Thread(target=run, args=(range(j, 64, 4),)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(64):
        assert receiver.poll(f"t{i}").first_token_id == i
        assert_same_kv(p_cache, [i % 60, i % 60 + 1], d_cache, [i], n)


def test_release_forgets_on_both_sides_and_aborts_a_live_transfer(setup):
    _, receiver, sender, _, _ = setup
    receiver.expect("t", [0], 4, lease_s=5)
    sender.begin("t", receiver.endpoint, 4)
    sender.release("t")
    assert receiver.poll("t").reason == "released"
    assert sender.poll("t").reason == "unknown transfer"
    sender.release("t")  # idempotent
    receiver.release("t")
    assert receiver.poll("t").reason == "unknown transfer"
    receiver.expect("t", [0], 4, lease_s=5)  # the id can be used again
    sender.begin("t", receiver.endpoint, 4)
    assert sender.poll("t").status is TransferStatus.PENDING


def test_inproc_is_a_transport_kind_on_the_process_wide_hub():
    torch.manual_seed(0)
    pk, pv = caches(8, P_BS, fill=True)
    receiver = make_receiver(TransportKind.INPROC, SPEC, *caches(8, D_BS), "tcp://ignored:*")
    sender = make_sender(TransportKind.INPROC, SPEC)
    hub = InProcHub.instance()
    assert InProcHub.instance() is hub and hub.lookup(receiver.endpoint) is receiver
    try:
        receiver.expect("t", [0, 1], 12, lease_s=5)
        sender.begin("t", receiver.endpoint, 12)
        send_all(sender, "t", (pk, pv), [0, 1, 2], 12)
        sender.finish("t", 5, note=b"stamps")
        assert sender.poll("t").status is TransferStatus.DONE
        assert receiver.poll("t").note == b"stamps"
        assert_same_kv((pk, pv), [0, 1, 2], (receiver.k_cache, receiver.v_cache), [0, 1], 12)
        # fault injection stays on the hub
        receiver.expect("bad", [2], 4, lease_s=5)
        sender.begin("bad", receiver.endpoint, 4)
        hub.corrupt_next("bad", 0)
        sender.send_layer("bad", 0, 0, pk[0, 0], pv[0, 0])
        assert "checksum mismatch" in sender.poll("bad").reason
    finally:
        sender.close()
        receiver.close()
    assert hub.lookup(receiver.endpoint) is None


def test_inproc_with_a_hub_of_its_own():
    own = InProcHub()
    receiver = make_receiver(TransportKind.INPROC, SPEC, *caches(4, D_BS), "", hub=own)
    assert own.lookup(receiver.endpoint) is receiver
    assert InProcHub.instance().lookup(receiver.endpoint) is None
    elsewhere = make_sender(TransportKind.INPROC, SPEC)  # on the process-wide hub
    elsewhere.begin("t", receiver.endpoint, 4)
    assert "no receiver at" in elsewhere.poll("t").reason
    mine = make_sender(TransportKind.INPROC, SPEC, hub=own)
    receiver.expect("t", [0], 4, lease_s=5)
    mine.begin("t", receiver.endpoint, 4)
    assert mine.poll("t").status is TransferStatus.PENDING
    receiver.close()
