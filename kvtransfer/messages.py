"""Control messages of the KV transfer protocol: typed dataclasses, msgpack on the wire.

Every message travels as one msgpack array `[MsgType, field, field, ...]` in dataclass
field order; `decode` rebuilds the dataclass and rejects anything malformed with a
ProtocolError, so a peer speaking another version fails loudly instead of misreading.
Payload bytes never go through msgpack: a `ChunkHeader` frame is followed by one raw frame
holding K then V, each `[tokens, kv_heads, head_dim]`, whose xxh3-64 is the header's
`checksum`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import msgpack
import xxhash

# 2: Done carries the prefill's hand-off note (bytes); 3: KeepAlive renews a lease;
# 4: the torch transport's rendezvous travels here (StoreRequest, StoreReply);
# 5: a transfer may start past position 0 (Done.start: the receiver holds the prefix)
PROTOCOL_VERSION = 5


# The receiver's Ack reason to a sender it has not (or no longer) accepted: it restarted, or
# evicted the pair. The sender then drops the connection; the next begin() handshakes anew.
NO_HANDSHAKE = "no handshake from this sender"

# The receiver's Ack reason to a connection that names a transfer another connection owns
# (kvtransfer.receiver, Authentication); the transfer itself is not touched.
FOREIGN_TRANSFER = "the transfer belongs to another connection"


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of this protocol version."""


class MsgType(enum.IntEnum):
    HANDSHAKE = 1
    HANDSHAKE_REPLY = 2
    CHUNK_HEADER = 3
    DONE = 4
    ABORT = 5
    ACK = 6
    KEEPALIVE = 7
    STORE_REQUEST = 8
    STORE_REPLY = 9


@dataclass(frozen=True)
class Handshake:
    """Sent once per sender-receiver pair; the receiver refuses a mismatch."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32"
    transport: str = "zmq"  # how payloads travel: "zmq" (in the message), "torch", "inproc"
    protocol_version: int = PROTOCOL_VERSION

    def mismatch(self, other: Handshake) -> str | None:
        """Why `other` cannot exchange KV with this side, or None when it can."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                return f"{f.name} differs: {mine!r} here, {theirs!r} at the peer"
        return None


@dataclass(frozen=True)
class HandshakeReply:
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class ChunkHeader:
    """One (transfer, layer, token range) frame; the raw K+V frame follows it."""

    transfer_id: str
    layer: int
    start: int  # first token position
    end: int  # one past the last token position
    dtype: str
    num_kv_heads: int
    head_dim: int
    checksum: int  # xxh3-64 of the payload frame; 0 where the payload stays on a GPU

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def payload_bytes(self, element_size: int) -> int:
        return 2 * self.num_tokens * self.num_kv_heads * self.head_dim * element_size


@dataclass(frozen=True)
class Done:
    """Every layer and token range of the transfer, positions [start, num_tokens), was
    sent; carries the first token and an opaque note from the sending side (msgpack bin)
    that the receiver hands out with DONE. `start` is the transfer's, as both sides were
    told it: the receiver fails a transfer whose sender started elsewhere."""

    transfer_id: str
    num_tokens: int
    first_token_id: int
    note: bytes = b""
    start: int = 0


@dataclass(frozen=True)
class Abort:
    transfer_id: str
    reason: str


@dataclass(frozen=True)
class Ack:
    """The receiver's verdict on a whole transfer."""

    transfer_id: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class KeepAlive:
    """The sender still means to send this transfer (its job waits in the prefill queue or
    computes): the receiver renews the transfer's lease, or answers a failing Ack when it no
    longer expects the transfer, so the sender drops the job before computing it."""

    transfer_id: str


@dataclass(frozen=True)
class StoreRequest:
    """torch transport: one operation of the sender's group on the pair's rendezvous store,
    which the receiver holds (kvtransfer.pair_store); only from an accepted peer."""

    seq: int  # echoed in the reply
    op: str  # a pair_store.StoreOp
    key: str
    value: bytes = b""
    expected: bytes = b""  # compare_set only


@dataclass(frozen=True)
class StoreReply:
    seq: int
    ok: bool
    value: bytes = b""
    reason: str = ""


Message = (Handshake | HandshakeReply | ChunkHeader | Done | Abort | Ack | KeepAlive
           | StoreRequest | StoreReply)
_TYPES: dict[MsgType, type] = {
    MsgType.HANDSHAKE: Handshake,
    MsgType.HANDSHAKE_REPLY: HandshakeReply,
    MsgType.CHUNK_HEADER: ChunkHeader,
    MsgType.DONE: Done,
    MsgType.ABORT: Abort,
    MsgType.ACK: Ack,
    MsgType.KEEPALIVE: KeepAlive,
    MsgType.STORE_REQUEST: StoreRequest,
    MsgType.STORE_REPLY: StoreReply,
}
_CODES = {cls: int(code) for code, cls in _TYPES.items()}
_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in _TYPES.values()}
# msgpack round-trips these exactly: str as str, bytes as bin (use_bin_type), int, bool
_FIELD_TYPES = {"str": str, "int": int, "bool": bool, "bytes": bytes}


def encode(msg: Message) -> bytes:
    # field by field, not dataclasses.astuple: that deep-copies and costs ~20 us a header
    cls = type(msg)
    return msgpack.packb([_CODES[cls], *(getattr(msg, name) for name in _NAMES[cls])],
                         use_bin_type=True)


def decode(frame: bytes | memoryview) -> Message:
    try:
        items = msgpack.unpackb(frame, raw=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable control frame: {e}") from e
    if not isinstance(items, list) or not items:
        raise ProtocolError("a control frame must be a non-empty msgpack array")
    try:
        cls = _TYPES[MsgType(items[0])]
    except (ValueError, TypeError):
        raise ProtocolError(f"unknown message type {items[0]!r}") from None
    cls_fields = fields(cls)
    values = items[1:]
    if len(values) != len(cls_fields):
        raise ProtocolError(f"{cls.__name__} needs {len(cls_fields)} fields, got {len(values)}")
    for f, v in zip(cls_fields, values, strict=True):
        expected = _FIELD_TYPES[f.type]
        if not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
            raise ProtocolError(f"{cls.__name__}.{f.name} must be {f.type}, got {v!r}")
    return cls(*values)


def checksum(payload: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)
