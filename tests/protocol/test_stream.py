"""The stream's wire format (tokens and prefill outcomes): round trip, and loud failure on
anything else; the hand-off note likewise."""

from __future__ import annotations

import msgpack
import pytest

from pdserve.protocol import (
    DecodeStamps,
    FinishReason,
    Handoff,
    PrefillOutcome,
    PrefillReport,
    PrefillStamps,
    PrefillStatus,
    TokenBatch,
    TokenChunk,
)
from pdserve.protocol.stream import STREAM_VERSION, MessageKind, decode, encode


def test_a_token_batch_round_trips():
    stamps = DecodeStamps(received=1.0, kv_received=2.0, decode_admitted=2.5, first_token=3.0,
                          finished=4.0)
    batch = TokenBatch("decode-0", 123.5, (
        TokenChunk("a", (1, 2)),
        TokenChunk("b", (7,), FinishReason.LENGTH, "", stamps, 32, 4096),
        TokenChunk("c", (), FinishReason.ERROR, "KV transfer failed: deadline", stamps),
    ))
    assert decode(encode(batch)) == batch


def test_a_prefill_report_round_trips():
    report = PrefillReport("prefill-0", 9.0, (
        PrefillOutcome("a", PrefillStatus.DONE, "", 16, PrefillStamps(1.0, 2.0, 3.0, 2.1, 3.2)),
        PrefillOutcome("b", PrefillStatus.FAILED, "KV transfer failed: refused"),
    ))
    assert decode(encode(report)) == report


@pytest.mark.parametrize("raw, match", [
    ([STREAM_VERSION + 1, MessageKind.TOKENS, "w", 1.0, []], "version"),
    ([STREAM_VERSION, MessageKind.TOKENS, "w", 1.0, [["a", [1], "sideways", "", None, 0, 0]]],
     "malformed"),
    ([STREAM_VERSION, MessageKind.PREFILL, "w", 1.0, [["a", "maybe", "", 0, []]]], "malformed"),
    ([STREAM_VERSION, 7, "w", 1.0, []], "malformed"),
    ([STREAM_VERSION, MessageKind.TOKENS, "w"], "malformed"),
])
def test_anything_else_is_a_value_error(raw, match):
    with pytest.raises(ValueError, match=match):
        decode(msgpack.packb(raw))


def test_garbage_bytes_are_a_value_error():
    with pytest.raises(ValueError, match="malformed"):
        decode(b"\xc1\x00garbage")


def test_the_handoff_note_round_trips_and_refuses_garbage():
    note = Handoff(48, 10.5, 11.25)
    assert Handoff.decode(note.encode()) == note
    for bad in (b"", b"\xc1", msgpack.packb([1, 2])):
        with pytest.raises(ValueError, match="hand-off"):
            Handoff.decode(bad)
