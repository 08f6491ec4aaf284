"""Control messages: round trips, rejection of malformed frames, checksums, handshakes."""

from __future__ import annotations

import msgpack
import pytest
import torch

from pdserve.kvtransfer.messages import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    ChunkHeader,
    Done,
    Handshake,
    HandshakeReply,
    ProtocolError,
    checksum,
    decode,
    encode,
)

HANDSHAKE = Handshake("smollm2-135m", 30, 3, 64, "float32")
MESSAGES = [
    HANDSHAKE,
    HandshakeReply(False, "num_layers differs"),
    ChunkHeader("t-1", 7, 0, 512, "float32", 3, 64, 2**64 - 1),
    Done("t-1", 512, 1234),
    Done("t-1", 512, 1234, b"\x00opaque stamps\xff"),
    Done("t-1", 512, 1234, b"", 448),  # the receiver holds [0, 448) already
    Abort("t-1", "client cancelled"),
    Ack("t-1", True),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xc1", "undecodable"),
        (msgpack.packb({"type": 1}), "non-empty msgpack array"),
        (msgpack.packb([99, "x"]), "unknown message type 99"),
        (msgpack.packb([4, "t", 3]), "Done needs 5 fields, got 2"),
        # a version-4 Done (no start) is refused, not read as a transfer from position 0
        (msgpack.packb([4, "t", 3, 5, b""]), "Done needs 5 fields, got 4"),
        (msgpack.packb([4, "t", "3", 5, b"", 0]), "Done.num_tokens must be int"),
        (msgpack.packb([4, "t", 3, 5, "text", 0]), "Done.note must be bytes"),
        (msgpack.packb([4, "t", 3, 5, b"", "0"]), "Done.start must be int"),
        (msgpack.packb([6, "t", 1, ""]), "Ack.ok must be bool"),
    ],
)
def test_malformed_frames_are_rejected(frame, message):
    with pytest.raises(ProtocolError, match=message):
        decode(frame)


def test_checksum_detects_a_flipped_byte():
    payload = bytearray(torch.randn(2, 16, 3, 64).numpy().tobytes())
    before = checksum(payload)
    payload[1000] ^= 0x01
    assert checksum(payload) != before
    assert checksum(memoryview(bytes(payload))) == checksum(bytes(payload))


def test_handshake_mismatch_names_the_field():
    assert HANDSHAKE.mismatch(HANDSHAKE) is None
    other = Handshake("smollm2-135m", 30, 3, 64, "bfloat16")
    assert HANDSHAKE.mismatch(other) == "dtype differs: 'float32' here, 'bfloat16' at the peer"
    older = Handshake("smollm2-135m", 30, 3, 64, "float32", protocol_version=1)  # no note
    assert "protocol_version" in HANDSHAKE.mismatch(older)
    # a version-4 peer sends every position from 0: it must not reach a delta receiver
    before_delta = Handshake("smollm2-135m", 30, 3, 64, "float32", protocol_version=4)
    assert HANDSHAKE.mismatch(before_delta) == (
        f"protocol_version differs: {PROTOCOL_VERSION} here, 4 at the peer")


def test_chunk_payload_size():
    header = ChunkHeader("t", 0, 16, 48, "float32", 3, 64, 0)
    assert header.num_tokens == 32
    assert header.payload_bytes(4) == 2 * 32 * 3 * 64 * 4
