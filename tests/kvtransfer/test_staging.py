"""Where and how K/V are staged: never on the caller's thread for the socket transports,
always through the one frame builder, and commands to the I/O thread are typed."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from kv_helpers import KINDS, SPEC, caches, make_receiver, make_sender, wait_for

import pdserve.kvtransfer.inproc as inproc_module
import pdserve.kvtransfer.sender as sender_module
from pdserve.kvtransfer.base import TransferStatus
from pdserve.kvtransfer.commands import Connect, SendAbort, SendChunk, SendDone
from pdserve.kvtransfer.frames import Scratch, stage_frames
from pdserve.kvtransfer.inline_channel import InlineSenderChannel
from pdserve.kvtransfer.layout import gather_tokens
from pdserve.kvtransfer.messages import checksum

HEADS, DIM = SPEC.num_kv_heads, SPEC.head_dim


def fused_kv(n: int, layer: int):
    """K and V as the model hands them over: non-contiguous column slices of one fused qkv
    output, reshaped to [tokens, kv_heads, head_dim], made under inference mode."""
    g = torch.Generator().manual_seed(layer)
    with torch.inference_mode():
        qkv = torch.randn(n, 3 * HEADS * DIM, generator=g)
        k = qkv[:, HEADS * DIM:2 * HEADS * DIM].reshape(n, HEADS, DIM)
        v = qkv[:, 2 * HEADS * DIM:].reshape(n, HEADS, DIM)
    assert not k.is_contiguous() and k.is_inference()
    return k, v


@pytest.mark.parametrize("kind", ["zmq", "torch"])
def test_send_layer_returns_before_anything_is_staged_and_never_stages_itself(
        kind, monkeypatch):
    gate, stagers = threading.Event(), []
    real = sender_module.stage_frames

    def held_stage_frames(*args, **kwargs):  # the I/O thread waits here until the gate opens
        stagers.append(threading.current_thread())
        assert gate.wait(10)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(sender_module, "stage_frames", held_stage_frames)
    receiver, sender = make_receiver(kind, caches(8, 8)), make_sender(kind)
    try:
        n = 12
        receiver.expect("t", [2, 5], n, lease_s=10)
        sender.begin("t", receiver.endpoint, n)
        sent = [fused_kv(n, layer) for layer in range(SPEC.num_layers)]
        for layer, (k, v) in enumerate(sent):
            sender.send_layer("t", layer, 0, k, v)  # would block here if it staged
        sender.finish("t", 3)  # wakes the I/O thread, which stages and waits at the gate
        deadline = time.monotonic() + 5
        while not stagers and time.monotonic() < deadline:
            time.sleep(0.005)
        assert stagers and threading.current_thread() not in stagers
        assert sender.poll("t").status is TransferStatus.TRANSFERRING  # nothing went out yet
        gate.set()
        assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
        assert threading.current_thread() not in stagers
        for layer, (k, v) in enumerate(sent):
            assert torch.equal(gather_tokens(receiver.k_cache[layer], [2, 5], 0, n), k)
            assert torch.equal(gather_tokens(receiver.v_cache[layer], [2, 5], 0, n), v)
    finally:
        gate.set()
        sender.close()
        receiver.close()


@pytest.mark.parametrize("kind", KINDS)
def test_every_transport_frames_through_the_one_builder(kind, monkeypatch):
    calls = []
    for module in (sender_module, inproc_module):
        real = module.stage_frames

        def counting(*args, _real=real, **kwargs):
            calls.append(args[:3])  # transfer id, layer, start
            yield from _real(*args, **kwargs)

        monkeypatch.setattr(module, "stage_frames", counting)
    receiver = make_receiver(kind, caches(8, 8))
    sender = make_sender(kind, max_frame_bytes=300)  # 128 bytes a token: 2-token frames
    try:
        receiver.expect("t", [0], 5, lease_s=5)
        sender.begin("t", receiver.endpoint, 5)
        for layer in range(SPEC.num_layers):
            sender.send_layer("t", layer, 0, *fused_kv(5, layer))
        sender.finish("t", 1)
        assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
        assert sorted(calls) == [("t", layer, 0) for layer in range(SPEC.num_layers)]
    finally:
        sender.close()
        receiver.close()


def test_zero_copy_frames_arrive_as_copied_ones_do():
    receiver = make_receiver("zmq", caches(8, 8))
    sender = make_sender("zmq", channel=InlineSenderChannel(zero_copy_bytes=512),
                         max_frame_bytes=1024)  # 8-token frames of 1 KiB, sent zero-copy
    try:
        receiver.expect("t", [0, 1, 2], 20, lease_s=5)
        sender.begin("t", receiver.endpoint, 20)
        sent = [fused_kv(20, layer) for layer in range(SPEC.num_layers)]
        for layer, (k, v) in enumerate(sent):
            sender.send_layer("t", layer, 0, k, v)
        sender.finish("t", 2)
        assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
        for layer, (k, v) in enumerate(sent):
            assert torch.equal(gather_tokens(receiver.k_cache[layer], [0, 1, 2], 0, 20), k)
            assert torch.equal(gather_tokens(receiver.v_cache[layer], [0, 1, 2], 0, 20), v)
    finally:
        sender.close()
        receiver.close()


def test_the_sender_queues_typed_frozen_commands():
    receiver, sender = make_receiver("zmq", caches(8, 8)), make_sender("zmq")
    queued = []
    put = sender._commands.put
    sender._commands.put = lambda cmd, wake=True: (queued.append(cmd), put(cmd, wake))
    try:
        receiver.expect("t", [0], 4, lease_s=5)
        sender.begin("t", receiver.endpoint, 4)
        k, v = fused_kv(4, 0)
        sender.send_layer("t", 0, 0, k, v)
        sender.finish("t", 9, note=b"n")
        sender.begin("u", receiver.endpoint, 4)
        sender.abort("u", "client cancelled")
        assert [type(c) for c in queued] == [Connect, SendChunk, SendDone, Connect, SendAbort]
        chunk, done, abort = queued[1], queued[2], queued[4]
        assert (chunk.transfer_id, chunk.layer, chunk.start, chunk.nbytes) == (
            "t", 0, 0, 2 * 4 * HEADS * DIM * 4)
        assert chunk.k is k and chunk.v is v  # references, not copies
        assert (done.done.first_token_id, done.done.note) == (9, b"n")
        assert abort.abort.reason == "client cancelled"
        for cmd in queued:
            assert cmd.endpoint == receiver.endpoint
            with pytest.raises(dataclasses.FrozenInstanceError):
                cmd.endpoint = "elsewhere"
        # one layer of three was sent: the Done went out and was judged
        assert wait_for(lambda: sender.poll("t")).reason == "layer 1 is missing tokens"
    finally:
        sender.close()
        receiver.close()


def test_small_chunks_wake_the_io_thread_once_a_batch_is_due():
    chunk_bytes = 2 * 4 * HEADS * DIM * 4  # 4 tokens
    receiver = make_receiver("zmq", caches(8, 8))
    sender = make_sender("zmq", wake_bytes=2 * chunk_bytes)
    wakes = []
    put = sender._commands.put
    sender._commands.put = lambda cmd, wake=True: (wakes.append((type(cmd), wake)),
                                                   put(cmd, wake))
    try:
        receiver.expect("t", [0, 1, 2], 5 * 4, lease_s=5)
        sender.begin("t", receiver.endpoint, 5 * 4)
        for layer in range(SPEC.num_layers):
            k, v = fused_kv(5 * 4, layer)
            for i in range(5):
                sender.send_layer("t", layer, 4 * i, k[4 * i:4 * i + 4], v[4 * i:4 * i + 4])
        sender.finish("t", 1)
        chunk_wakes = [wake for kind, wake in wakes if kind is SendChunk]
        assert chunk_wakes == [False, True] * (5 * SPEC.num_layers // 2) + [False]
        assert wakes[0] == (Connect, True) and wakes[-1] == (SendDone, True)
        assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
        # a connected endpoint needs no wake-up to begin
        receiver.expect("u", [3], 4, lease_s=5)
        sender.begin("u", receiver.endpoint, 4)
        assert wakes[-1] == (Connect, False)
    finally:
        sender.close()
        receiver.close()


def test_frames_split_copy_views_and_hash_their_bytes():
    k, v = fused_kv(7, 0)
    frames = list(stage_frames("t", 4, 10, k, v, max_frame_bytes=3 * 2 * HEADS * DIM * 4))
    assert [(f.header.start, f.header.end) for f in frames] == [(10, 13), (13, 16), (16, 17)]
    for f in frames:
        h = f.header
        assert (h.transfer_id, h.layer, h.dtype, h.num_kv_heads, h.head_dim) == (
            "t", 4, "float32", HEADS, DIM)
        assert h.checksum == checksum(memoryview(f.payload.numpy()))
        kv = f.payload.view(torch.float32).view(2, h.num_tokens, HEADS, DIM)
        assert torch.equal(kv[0], k[h.start - 10:h.end - 10])
        assert torch.equal(kv[1], v[h.start - 10:h.end - 10])
    with pytest.raises(ValueError, match="must both be"):
        next(stage_frames("t", 0, 0, k, v[:3], 1 << 20))


def test_two_byte_kv_is_staged_as_its_own_bytes():
    """bfloat16 (which numpy has no type for) from non-contiguous views: the host copy
    moves raw bytes, so the frame holds exactly K then V."""
    k32, v32 = fused_kv(5, 1)
    with torch.inference_mode():
        k, v = k32.to(torch.bfloat16), v32.to(torch.bfloat16)
        k, v = k.transpose(0, 1).contiguous().transpose(0, 1), v  # another stride pattern
    (frame,) = stage_frames("t", 0, 0, k, v, 1 << 20)
    assert frame.header.dtype == "bfloat16"
    kv = frame.payload.view(torch.bfloat16).view(2, 5, HEADS, DIM)
    assert torch.equal(kv[0], k) and torch.equal(kv[1], v)


def test_kv_with_a_strided_head_dim_is_staged_by_torch_alike():
    """K/V whose head_dim is not unit-strided (no byte view): torch's copy, same bytes."""
    k, v = fused_kv(6, 2)
    k2, v2 = torch.stack((k, k), -1)[..., 0], torch.stack((v, v), -1)[..., 1]
    assert k2.stride(-1) == 2 and torch.equal(k2, k)
    frames = list(stage_frames("t", 0, 0, k2, v2, 4 * 2 * HEADS * DIM * 4))
    assert [f.header.num_tokens for f in frames] == [4, 2]
    for f in frames:
        h = f.header
        assert h.checksum == checksum(memoryview(f.payload.numpy()))
        kv = f.payload.view(torch.float32).view(2, h.num_tokens, HEADS, DIM)
        assert torch.equal(kv[0], k[h.start:h.end]) and torch.equal(kv[1], v[h.start:h.end])


def test_a_scratch_buffer_is_reused_and_grows():
    scratch = Scratch()
    a = scratch.take(100)
    b = scratch.take(64)
    assert a.data_ptr() == b.data_ptr() and b.numel() == 64
    c = scratch.take(1000)
    assert c.numel() == 1000
    assert scratch.take(10).data_ptr() == c.data_ptr()
