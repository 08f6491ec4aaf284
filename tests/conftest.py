"""Shared fixtures: tiny random-weight models written to disk once per session, the real
SmolLM2 model loaded once per session, the `gpu` marker's skip, and, in a failing test's
report, the worker processes that died under it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names the worker processes (tests/worker_procs) that died
    under it, and how (a signal, or an exit code)."""
    outcome = yield
    report = outcome.get_result()
    procs = sys.modules.get("worker_procs")
    if report.failed and procs is not None and (dead := procs.dead_workers()):
        report.sections.append(("worker processes that died", "\n".join(dead)))


def _write_tiny(folder: Path, config, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger weights than HF's init: peaked logits, so greedy argmax has no near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    return folder


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**TINY, tie_word_embeddings=False, rope_theta=10000.0)
    return _write_tiny(tmp_path_factory.mktemp("tiny-llama"), cfg, seed=1)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    """Tied embeddings and llama3 RoPE scaling."""
    from transformers import LlamaConfig

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64, rope_theta=50000.0)
    cfg = LlamaConfig(**TINY, tie_word_embeddings=True, rope_scaling=scaling,
                      rope_theta=50000.0)
    return _write_tiny(tmp_path_factory.mktemp("tiny-llama3"), cfg, seed=2)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """q/k/v biases, as Qwen2 has."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1000000.0)
    return _write_tiny(tmp_path_factory.mktemp("tiny-qwen2"), cfg, seed=3)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pdserve.engine import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_dir):
    from pdserve.engine import LLM

    return LLM(str(smollm2_dir), num_blocks=512)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
