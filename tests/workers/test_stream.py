"""The token stream's wire format: round trip, and loud failure on anything else."""

from __future__ import annotations

import msgpack
import pytest
from pdserve.decode_worker import DecodeStamps, StreamFinish, TokenBatch, TokenChunk
from pdserve.decode_worker.stream import STREAM_VERSION


def test_a_batch_round_trips():
    stamps = DecodeStamps(received=1.0, kv_received=2.0, decode_admitted=2.5, first_token=3.0,
                          finished=4.0)
    batch = TokenBatch("decode-0", 123.5, (
        TokenChunk("a", (1, 2)),
        TokenChunk("b", (7,), StreamFinish.LENGTH, "", stamps),
        TokenChunk("c", (), StreamFinish.ERROR, "KV transfer failed: deadline", stamps),
    ))
    assert TokenBatch.decode(batch.encode()) == batch


@pytest.mark.parametrize("raw, match", [
    ([STREAM_VERSION + 1, "w", 1.0, []], "version"),
    ([STREAM_VERSION, "w", 1.0, [["a", [1], "sideways", "", None]]], "malformed"),
    ([STREAM_VERSION, "w"], "malformed"),
])
def test_anything_else_is_a_value_error(raw, match):
    with pytest.raises(ValueError, match=match):
        TokenBatch.decode(msgpack.packb(raw))


def test_garbage_bytes_are_a_value_error():
    with pytest.raises(ValueError, match="malformed"):
        TokenBatch.decode(b"\xc1\x00garbage")
