"""The offline `LLM` API on the real SmolLM2: text, chat, stop conditions."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_leaks

from pdserve.engine import SamplingParams

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Say hello."}]


def test_generate_accepts_text_and_token_prompts(smollm2_llm):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    text_out, = smollm2_llm.generate("The capital of France is", params)
    ids = smollm2_llm.tokenizer.encode("The capital of France is")
    ids_out, = smollm2_llm.generate([ids], params)
    assert text_out.token_ids == ids_out.token_ids
    assert text_out.text == smollm2_llm.tokenizer.decode(text_out.token_ids)
    assert text_out.finish_reason == "length"
    assert_no_leaks(smollm2_llm.engine)


def test_eos_ends_a_chat_reply(smollm2_llm):
    out, = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=64, temperature=0.0))
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == smollm2_llm.tokenizer.eos_token_id
    assert "hello" in out.text.lower()
    assert_no_leaks(smollm2_llm.engine)


def test_stop_string_cuts_text_exactly(smollm2_llm):
    full, = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=40, temperature=0.0))
    cut, = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=40, temperature=0.0,
                                                 stop=["world"]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index("world")]
    assert len(cut.token_ids) < len(full.token_ids)
    assert_no_leaks(smollm2_llm.engine)


def test_stop_token_ids_and_ignore_eos(smollm2_llm):
    full, = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=40, temperature=0.0))
    stop_at = full.token_ids[3]
    cut, = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=40, temperature=0.0,
                                                 stop_token_ids=[stop_at]))
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop_at) + 1]
    long, = smollm2_llm.chat(CHAT, SamplingParams(max_tokens=len(full.token_ids) + 5,
                                                  temperature=0.0, ignore_eos=True))
    assert long.finish_reason == "length"
    assert long.token_ids[: len(full.token_ids)] == full.token_ids
    assert_no_leaks(smollm2_llm.engine)


def test_stream_yields_the_generated_text(smollm2_llm):
    params = SamplingParams(max_tokens=20, temperature=0.0)
    ids = smollm2_llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
    pieces = list(smollm2_llm.stream(list(ids), params))
    out, = smollm2_llm.chat(CHAT, params)
    assert "".join(pieces) == out.text and len(pieces) > 5
    assert_no_leaks(smollm2_llm.engine)


def test_the_reported_temperature_1e_38_request_gives_the_greedy_reply(smollm2_llm):
    """Once NaN in the sampler (and a dead worker loop): now below the floor, so greedy."""
    prompt = "The capital of France is"
    tiny, = smollm2_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1e-38))
    want, = smollm2_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))
    assert tiny.token_ids == want.token_ids and tiny.finish_reason == "length"
    assert_no_leaks(smollm2_llm.engine)


def test_stream_raises_the_engine_error_when_its_request_fails(smollm2_llm, monkeypatch):
    runner = smollm2_llm.engine.runner
    execute = runner.execute

    def nan_logits(batch, hook=None):  # fault injection: every row turns NaN
        logits = execute(batch, hook)
        with torch.inference_mode():
            logits.fill_(float("nan"))
        return logits

    monkeypatch.setattr(runner, "execute", nan_logits)
    with pytest.raises(RuntimeError, match="^sampling failed: the logits hold NaN/inf$"):
        list(smollm2_llm.stream("Hello", SamplingParams(max_tokens=4, temperature=0.0)))
    assert_no_leaks(smollm2_llm.engine)
