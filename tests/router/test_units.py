"""Pure parts of the router: policies, the prefix hash chain (equal to the engine's), and the
token-stream reader (equal to the decode worker's writer)."""

from __future__ import annotations

import pytest
from pdserve.decode_worker import DecodeStamps, StreamFinish, TokenBatch, TokenChunk
from pdserve.engine.block_manager import hash_block
from pdserve.router.policy import (
    Hint,
    WorkerLoad,
    choose_decode,
    choose_prefill,
    round_robin,
    should_disaggregate,
)
from pdserve.router.prefix import block_hashes
from pdserve.router.stream import decode_batch


def load(wid, free=100, running=0, waiting=0, queued=0, in_flight=0, block_size=16):
    return WorkerLoad(wid, free, 100, block_size, running, waiting, queued, in_flight)


def test_disaggregation_follows_the_hint_and_the_threshold():
    assert should_disaggregate(Hint.ALWAYS, 5, 128, True)
    assert not should_disaggregate(Hint.NEVER, 5000, 128, True)
    assert should_disaggregate(Hint.AUTO, 128, 128, True)
    assert not should_disaggregate(Hint.AUTO, 127, 128, True)
    assert not should_disaggregate(Hint.ALWAYS, 5000, 128, False)  # no prefill worker


def test_decode_choice_prefers_the_smaller_batch_then_free_blocks_and_needs_room():
    a, b, c = load("a", running=5), load("b", running=2, free=10), load("c", running=2, free=50)
    assert choose_decode([a, b, c], 100, max_in_flight=8).worker_id == "c"
    assert choose_decode([a, b, c], 100 * 16, max_in_flight=8) is None  # no room anywhere
    assert choose_decode([a, b, c], 400, max_in_flight=8).worker_id == "c"  # b lacks blocks
    assert choose_decode([load("a", in_flight=8)], 10, max_in_flight=8) is None  # slots full


def test_prefill_choice_weighs_queued_tokens_against_cached_prefix():
    a, b = load("a", queued=100), load("b", queued=0)
    assert choose_prefill([a, b], 500, {}, 8).worker_id == "b"
    # a holds 30 of the prompt's blocks (480 tokens): 100 + 20 < 0 + 500
    assert choose_prefill([a, b], 500, {"a": 30}, 8).worker_id == "a"
    assert choose_prefill([load("a", in_flight=8)], 5, {}, 8) is None


def test_round_robin_cycles_over_workers_with_a_free_slot():
    ws = [load("b"), load("a"), load("c", in_flight=8)]
    assert [round_robin(ws, t, 8).worker_id for t in range(4)] == ["a", "b", "a", "b"]


@pytest.mark.parametrize("block_size", [4, 16])
def test_the_router_hash_chain_equals_the_engine_block_hashes(block_size):
    tokens = [(i * 7919) % 49152 for i in range(70)]
    parent, expected = None, []
    for i in range(len(tokens) // block_size):
        parent = hash_block(parent, tokens[i * block_size:(i + 1) * block_size])
        expected.append(parent)
    assert block_hashes(tokens, block_size) == expected


def test_the_router_reads_what_the_decode_worker_writes():
    stamps = DecodeStamps(1.0, 0.0, 0.0, 2.0, 2.5, 3.0, 4.0)
    batch = TokenBatch("decode-0", 9.5, (TokenChunk("t1", (5, 6)),
                                         TokenChunk("t2", (7,), StreamFinish.LENGTH, "", stamps)))
    first, last = decode_batch(batch.encode())
    assert (first.worker_id, first.time, first.transfer_id, first.token_ids, first.finish) == (
        "decode-0", 9.5, "t1", (5, 6), None)
    assert last.finish == "length" and last.stamps == {
        "received": 1.0, "prefill_start": 0.0, "prefill_end": 0.0, "kv_received": 2.0,
        "decode_admitted": 2.5, "first_token": 3.0, "finished": 4.0}
    with pytest.raises(ValueError, match="version"):
        decode_batch(b"\x94\x02\xa1w\x00\x90")
