"""Our Llama-family model against transformers, the oracle: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_no_leaks,
    greedy,
    hf_greedy,
    make_engine,
    prefill_logits,
    run_to_completion,
)

PROMPTS = {
    "a": [5, 17, 99, 3, 250, 41, 8],
    "b": list(range(10, 47)),
    "c": [200],
    "d": [(i * 37) % 256 for i in range(70)],
}
TINY_MODELS = ["tiny_llama_dir", "tiny_llama3_dir", "tiny_qwen2_dir"]


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("model_fixture", TINY_MODELS)
def test_prefill_logits_match_transformers(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    engine = make_engine(model_dir)
    hf = _hf(model_dir)
    ours = prefill_logits(engine, PROMPTS)  # all four prompts in one batched step
    for rid, tokens in PROMPTS.items():
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0, -1].float()
        assert _rel_err(ours[rid], ref) < 1e-4, rid
    assert_no_leaks(engine)


@pytest.mark.parametrize("model_fixture", TINY_MODELS)
def test_greedy_tokens_match_transformers_generate(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    engine = make_engine(model_dir)
    hf = _hf(model_dir)
    for rid, tokens in PROMPTS.items():
        engine.add_request(rid, tokens, greedy(24))
    ours = run_to_completion(engine)
    for rid, tokens in PROMPTS.items():
        assert ours[rid] == hf_greedy(hf, tokens, 24), rid
    assert_no_leaks(engine)


def test_decode_logits_match_transformers(tiny_llama_dir):
    """Logits of a decode step (one new token over a paged context) match a full forward."""
    engine = make_engine(tiny_llama_dir, block_size=3)
    hf = _hf(tiny_llama_dir)
    prompt = PROMPTS["d"]
    engine.add_request("r", prompt, greedy(5))
    produced: list[int] = []
    while len(produced) < 4:
        batch = engine.scheduler.schedule()
        logits = engine.runner.execute(batch)
        context = prompt + produced
        with torch.no_grad():
            ref = hf(torch.tensor([context])).logits[0, -1].float()
        assert _rel_err(logits[0], ref) < 1e-4
        token = int(logits[0].argmax())
        engine.scheduler.update(batch, [token])
        produced.append(token)
    engine.abort("r")
    assert_no_leaks(engine)


@pytest.mark.slow
def test_smollm2_greedy_chat_matches_transformers(smollm2_llm, smollm2_hf):
    from pdserve.engine import SamplingParams

    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain what a prime number is in two sentences.",
        "List three fruits that are red.",
        "How do I reverse a list in Python?",
    ]
    convs = [[{"role": "user", "content": q}] for q in questions]
    outs = smollm2_llm.chat(convs, SamplingParams(max_tokens=32, temperature=0.0,
                                                  ignore_eos=True))
    for out in outs:
        assert len(out.token_ids) == 32
        assert out.token_ids == hf_greedy(smollm2_hf, out.prompt_token_ids, 32)
    assert "Paris" in outs[0].text
    assert_no_leaks(smollm2_llm.engine)


@pytest.mark.parametrize("rows", [1, 2, 5, 64, 65])
@pytest.mark.parametrize("with_kernels", [True, False], ids=["kernels", "no-kernels"])
def test_cpu_linears_match_plain_linear(rows, with_kernels):
    from torch import nn

    from pdserve.engine.cpu_kernels import cpu_kernels
    from pdserve.engine.model.cpu_linear import CpuLinear, optimize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(rows, 16)
    weights = [model[0].weight.data_ptr(), model[2].weight.data_ptr()]
    with torch.inference_mode():
        ref = model(x)
        # without kernels (no compiler on the machine) F.linear serves every row count
        assert optimize_linears(model, cpu_kernels() if with_kernels else None) == 2
        assert isinstance(model[0], CpuLinear) and isinstance(model[2], CpuLinear)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    # the weights are held once: the layers read the storage they were given
    assert [model[0].weight.data_ptr(), model[2].weight.data_ptr()] == weights
    assert not any(isinstance(b, torch.Tensor) and b.is_mkldnn for b in vars(model[0]).values())
