"""Delta transfers on every transport: the receiver holds a prefix of the sequence already
(the decode engine's cached blocks), both sides are told where the transfer starts, and
only the positions from there on travel, into blocks that hold them from their first slot.
The receiver is never given the prefix's blocks, so nothing a sender does reaches them."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import KINDS, SPEC, caches, make_receiver, make_sender, send_layers, wait_for

from pdserve.kvtransfer.base import TransferStatus
from pdserve.kvtransfer.layout import gather_tokens

D_BLOCK = 8  # the decode side's block size; a transfer starts at a multiple of it
BYTES_PER_TOKEN = 2 * SPEC.num_kv_heads * SPEC.head_dim * SPEC.dtype.itemsize  # per layer


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def pair(kind):
    """A receiver over an 8-token-block cache whose every slot holds 7.0 (what a cached
    block holds, as far as this test sees), and a sender of the same kind."""
    kv = caches(32, D_BLOCK)
    for cache in kv:
        cache.fill_(7.0)
    receiver = make_receiver(kind, kv)
    sender = make_sender(kind, handshake_timeout_s=2.0, ack_timeout_s=2.0)
    yield receiver, sender
    sender.close()
    receiver.close()


# (tokens, start): a few whole blocks held; all but the last token's partial block held
@pytest.mark.parametrize("n, start", [(29, 16), (17, 16), (13, 0)])
def test_only_the_positions_from_start_travel_into_the_fresh_blocks(pair, p_cache, n, start):
    receiver, sender = pair
    p_blocks = [7, 2, 9, 4, 11, 5, 1, 30]  # the prefill side's 4-token blocks
    fresh = [3, 12, 6][: -(-(n - start) // D_BLOCK)]
    receiver.expect("t", fresh, n, lease_s=5, start=start)
    sender.begin("t", receiver.endpoint, n, start)
    send_layers(sender, "t", p_cache, p_blocks, n)  # from 0: the sender drops [0, start)
    sender.finish("t", 42)
    assert wait_for(lambda: sender.poll("t")).status is TransferStatus.DONE
    result = receiver.poll("t")
    assert result.status is TransferStatus.DONE and result.first_token_id == 42
    assert result.num_bytes == (n - start) * BYTES_PER_TOKEN * SPEC.num_layers
    untouched = [b for b in range(32) if b not in fresh]
    for layer in range(SPEC.num_layers):
        for src, dst in zip(p_cache, (receiver.k_cache, receiver.v_cache), strict=True):
            assert torch.equal(gather_tokens(dst[layer], fresh, 0, n - start),
                               gather_tokens(src[layer], p_blocks, start, n))
            assert bool((dst[layer, untouched] == 7.0).all())


def test_a_frame_below_the_start_fails_the_transfer(pair, p_cache):
    """A sender that was told start 0 sends the prefix: the receiver refuses it rather than
    writing past its blocks, and both sides end FAILED."""
    receiver, sender = pair
    receiver.expect("t", [3, 12], 29, lease_s=5, start=16)
    sender.begin("t", receiver.endpoint, 29)
    send_layers(sender, "t", p_cache, [7, 2, 9, 4, 11, 5, 1, 30], 29)
    sender.finish("t", 42)
    assert "outside [16, 29)" in wait_for(lambda: receiver.poll("t")).reason
    assert wait_for(lambda: sender.poll("t")).status is TransferStatus.FAILED
    assert bool((receiver.k_cache[:, [b for b in range(32) if b not in (3, 12)]] == 7.0).all())


def test_a_sender_that_starts_later_than_expected_fails_at_done(pair, p_cache):
    receiver, sender = pair
    receiver.expect("t", [3, 12, 6], 29, lease_s=5, start=8)
    sender.begin("t", receiver.endpoint, 29, 16)
    send_layers(sender, "t", p_cache, [7, 2, 9, 4, 11, 5, 1, 30], 29)
    sender.finish("t", 42)
    result = wait_for(lambda: receiver.poll("t"))
    assert result.status is TransferStatus.FAILED
    assert "sender sent from position 16, the receiver expected 8" in result.reason
    assert wait_for(lambda: sender.poll("t")).status is TransferStatus.FAILED


def test_bad_starts_are_refused_up_front(pair):
    receiver, sender = pair
    with pytest.raises(ValueError, match="start 29 outside"):
        receiver.expect("t", [3], 29, lease_s=5, start=29)
    with pytest.raises(ValueError, match="13 tokens do not fit in 1 blocks"):
        receiver.expect("t", [3], 29, lease_s=5, start=16)
    with pytest.raises(ValueError, match="start 29 outside"):
        sender.begin("t", receiver.endpoint, 29, 29)
    assert receiver.poll("t").reason == "unknown transfer"
    assert sender.poll("t").reason == "unknown transfer"
