"""A request whose own computation fails ends alone with ERROR and a reason; the rest of its
batch gets exactly the tokens of a clean run, every block comes back, and the engine serves
on. Parameters that once produced NaN are computed (as greedy where they mean greedy).

Faults are injected from outside a real engine (tests/faults.py)."""

from __future__ import annotations

import pytest
from faults import Faults
from helpers import assert_no_leaks, greedy, make_engine, run_to_completion

from pdserve.engine import LLM, Engine, RequestOutput, SamplingParams
from pdserve.protocol import FinishReason

PROMPTS = {
    "a": [3, 1, 4, 1, 5],
    "bad": [2, 7, 1, 8, 2, 8, 1, 8],
    "b": list(range(10, 40)),
    "c": [9, 9, 8, 7],
}
PARAMS = {
    "a": greedy(10),
    "bad": greedy(10),
    "b": SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=11),
    "c": SamplingParams(max_tokens=10, temperature=1.2, top_k=20, seed=12),
}


def _run(engine: Engine) -> tuple[dict[str, list[int]], dict[str, RequestOutput]]:
    """Every request of PROMPTS through `engine`: tokens and final output per request."""
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, PARAMS[rid])
    tokens: dict[str, list[int]] = {}
    finals: dict[str, RequestOutput] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
    return tokens, finals


@pytest.fixture(scope="module")
def clean(tiny_llama_dir) -> dict[str, list[int]]:
    tokens, finals = _run(make_engine(tiny_llama_dir))
    assert all(f.finish_reason is FinishReason.LENGTH for f in finals.values())
    return tokens


def _serves_on(engine: Engine, clean: dict[str, list[int]]) -> None:
    """The engine, all blocks back, serves a new request as a clean one would."""
    assert_no_leaks(engine)
    engine.add_request("next", PROMPTS["a"], PARAMS["a"])
    assert run_to_completion(engine)["next"] == clean["a"]
    assert_no_leaks(engine)


@pytest.mark.parametrize("after_tokens", [0, 3])  # in its prefill step, mid-decode
def test_nan_logits_fail_their_request_alone(tiny_llama_dir, clean, after_tokens):
    engine = make_engine(tiny_llama_dir)
    Faults(engine).nan_logits("bad", after_tokens)
    tokens, finals = _run(engine)
    bad = finals["bad"]
    assert bad.finish_reason is FinishReason.ERROR and bad.new_token_ids == ()
    assert bad.error == "sampling failed: the logits hold NaN/inf"
    assert tokens.get("bad", []) == clean["bad"][:after_tokens]
    for rid in ("a", "b", "c"):
        assert finals[rid].finish_reason is FinishReason.LENGTH
        assert tokens[rid] == clean[rid], rid
    _serves_on(engine, clean)


def test_an_exception_while_sampling_one_row_fails_that_request_alone(
        tiny_llama_dir, clean, monkeypatch):
    engine = make_engine(tiny_llama_dir)
    sample_row = engine.sampler._sample_row

    def failing(request_id, logits, p):
        if request_id == "b" and engine.scheduler.requests["b"].num_output_tokens == 2:
            raise RuntimeError("injected sampling fault")
        return sample_row(request_id, logits, p)

    monkeypatch.setattr(engine.sampler, "_sample_row", failing)
    tokens, finals = _run(engine)
    assert finals["b"].finish_reason is FinishReason.ERROR
    assert finals["b"].error == "sampling failed: RuntimeError: injected sampling fault"
    assert tokens["b"] == clean["b"][:2]
    for rid in ("a", "bad", "c"):
        assert tokens[rid] == clean[rid], rid
    assert "b" not in engine.sampler._request_generators  # its seeded generator is gone
    _serves_on(engine, clean)


def test_a_failed_forward_fails_its_batch_and_the_engine_serves_on(tiny_llama_dir, clean):
    # two sequences at a time: "a" and "bad" share the first batches, "b" and "c" wait
    engine = make_engine(tiny_llama_dir, max_num_seqs=2)
    faults = Faults(engine)
    faults.raise_in_forward("bad")
    tokens, finals = _run(engine)
    for rid in ("a", "bad"):
        assert finals[rid].finish_reason is FinishReason.ERROR, rid
        assert finals[rid].error == "model step failed: InjectedFault: injected forward fault"
        assert tokens[rid] == []
    for rid in ("b", "c"):
        assert tokens[rid] == clean[rid], rid
    _serves_on(engine, clean)


def test_an_aborted_request_is_not_failed_again(tiny_llama_dir, clean):
    """A failure reported for a request that already left changes nothing."""
    engine = make_engine(tiny_llama_dir)
    engine.add_request("x", PROMPTS["a"], greedy(4))
    engine.abort("x")
    assert engine.scheduler.fail("x", "late") is None
    _serves_on(engine, clean)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), block_size=4, num_blocks=256)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, temperature=1e-38),  # once NaN, and a dead worker
    SamplingParams(max_tokens=8, temperature=5e-324, top_p=0.5, top_k=3, seed=1),
    SamplingParams(max_tokens=8, temperature=9e-6, seed=2**64 - 1),
    SamplingParams(max_tokens=8, temperature=0.9, top_p=1e-300, seed=-(2**63)),
], ids=["t=1e-38", "t=5e-324", "t=9e-6", "top_p=1e-300"])
def test_edge_parameters_give_the_greedy_tokens(tiny_llm, params):
    prompts = [PROMPTS["a"], PROMPTS["b"]]
    expected = tiny_llm.generate(prompts, greedy(8))
    got = tiny_llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert all(o.finish_reason == "length" and not o.error for o in got)
    assert_no_leaks(tiny_llm.engine)


def test_a_huge_temperature_is_computed(tiny_llm):
    out = tiny_llm.generate([PROMPTS["a"]], SamplingParams(max_tokens=8, temperature=1e30,
                                                           seed=4))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert all(0 <= t < 256 for t in out.token_ids)
    assert_no_leaks(tiny_llm.engine)


def test_llm_reports_a_failed_request_and_returns_the_others(tiny_llama_dir, clean):
    llm = LLM(str(tiny_llama_dir), block_size=4, num_blocks=256)
    Faults(llm.engine).nan_logits("gen-1", after_tokens=1)  # the second prompt of the call
    outs = llm.generate([PROMPTS["a"], PROMPTS["bad"]], greedy(10))
    assert outs[0].finish_reason == "length" and outs[0].token_ids == clean["a"]
    assert outs[1].finish_reason == "error" and outs[1].token_ids == clean["bad"][:1]
    assert outs[1].error == "sampling failed: the logits hold NaN/inf"
    assert_no_leaks(llm.engine)
