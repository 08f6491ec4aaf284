"""Payload in the ZMQ message itself: `[ChunkHeader, K+V bytes]`, TCP or IPC.

Frames below `zero_copy_bytes` (all frames of the default 1 MiB) are copied into ZMQ
(`copy=True`) from one reused scratch buffer: pyzmq's zero-copy path hands each frame's
release to its garbage-collector thread, one more wake-up and GIL hand-off per frame on
the prefill's core, and a fresh buffer per frame. Copying a frame of up to 1 MiB cost no
throughput at 8 and 64 MB (bench/README.md). Larger frames go zero-copy from a fresh
buffer that ZMQ releases once sent.
"""

from __future__ import annotations

import torch
import zmq

from pdserve.kvtransfer.channel import ReceiverChannel, SenderChannel
from pdserve.kvtransfer.frames import Frame, Scratch
from pdserve.kvtransfer.messages import ChunkHeader, encode


class InlineSenderChannel(SenderChannel):
    transport = "zmq"

    def __init__(self, zero_copy_bytes: int = 2 << 20):
        self.zero_copy_bytes = zero_copy_bytes
        self._scratch = Scratch()

    def alloc(self, nbytes: int) -> torch.Tensor:
        if nbytes < self.zero_copy_bytes:
            return self._scratch.take(nbytes)  # consumed by ship's copy before the next frame
        return torch.empty(nbytes, dtype=torch.uint8)

    def ship(self, endpoint: str, sock: zmq.Socket, frame: Frame) -> None:
        payload = frame.payload
        copy = payload.numel() < self.zero_copy_bytes
        sock.send_multipart([encode(frame.header), memoryview(payload.numpy())], copy=copy)


class InlineReceiverChannel(ReceiverChannel):
    transport = "zmq"

    def on_chunk(self, peer: bytes, header: ChunkHeader, rest: list[zmq.Frame]) -> None:
        if len(rest) != 1:
            return self.sink.reject(peer, header.transfer_id,
                                    "chunk header without its payload frame")
        self.sink.deliver(peer, header, rest[0].buffer)
