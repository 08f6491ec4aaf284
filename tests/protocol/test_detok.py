"""Streaming text equals a full decode: BPE spacing, multi-byte UTF-8 split over tokens,
stop strings cut exactly (never half-streamed), chat template equals transformers'."""

from __future__ import annotations

import random

import pytest

from pdserve.protocol import IncrementalDetokenizer
from pdserve.router.tokenizer import RouterTokenizer


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return RouterTokenizer(smollm2_dir)


def stream(tok, ids, stop=(), step=1):
    d = IncrementalDetokenizer(tok.decode, stop)
    pieces = []
    for i in range(0, len(ids), step):
        delta = d.add(ids[i:i + step])
        pieces.append(delta.text)
        if delta.stopped:
            return pieces, True
    pieces.append(d.finish().text)
    return pieces, False


TEXTS = ["Hello world, how are you?  Fine.\n\nNext line",
         "naïve café — 日本語のテキスト 🤖🎉 emoji",
         "  leading spaces and\ttabs", "def f(x):\n    return x ** 2\n"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_streamed_pieces_join_to_the_full_decode(tok, text, step):
    ids = tok.encode(text)
    pieces, stopped = stream(tok, ids, step=step)
    assert not stopped
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_a_character_split_over_byte_tokens_is_never_emitted_half(tok):
    ids = tok.encode("🤖")
    assert len(ids) > 1  # byte-level BPE: the emoji spans tokens
    pieces, _ = stream(tok, ids)
    assert pieces[:-1] == [""] * (len(pieces) - 1) or "".join(pieces) == "🤖"
    assert "".join(pieces) == "🤖"


def test_random_token_sequences_match_the_full_decode(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(49152) for _ in range(rng.randrange(1, 40))]
        pieces, _ = stream(tok, ids)
        # a trailing incomplete character is released at finish, as a full decode shows it
        assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("stop, expected", [
    (("world",), "Hello "),
    ((", how",), "Hello world"),
    (("\n\n",), "Hello world, how are you?  Fine."),
    (("Fine", "how"), "Hello world, "),
    (("absent",), TEXTS[0]),
])
def test_stop_strings_cut_exactly_and_are_never_streamed(tok, stop, expected):
    ids = tok.encode(TEXTS[0])
    pieces, stopped = stream(tok, ids, stop)
    assert "".join(pieces) == expected
    assert stopped is (expected != TEXTS[0])
    for s in stop:  # no piece, nor the join, ever showed the stop string
        assert s not in "".join(pieces)


def test_chat_template_matches_transformers(tok, smollm2_llm):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = smollm2_llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
    assert tok.apply_chat_template(conv) == list(expected)
    assert tok.encode("Hello there") == smollm2_llm.tokenizer.encode("Hello there")
    assert tok.limits.max_model_len == smollm2_llm.engine.config.model.max_model_len
    assert set(tok.limits.eos_token_ids) == set(smollm2_llm.engine.config.model.eos_token_ids)
