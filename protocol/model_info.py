"""What the router and the engine both read from a model folder without loading it: the
vocabulary size, the longest sequence, and the EOS token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int  # prompt + output tokens; capped at a sliding window
    eos_token_ids: tuple[int, ...]  # from config.json and generation_config.json


def read_model_limits(folder: str | Path, default_vocab_size: int | None = None) -> ModelLimits:
    """Raises ValueError for a folder without a readable config.json."""
    folder = Path(folder)
    config = _read_json(folder / "config.json", required=True)
    generation = _read_json(folder / "generation_config.json", required=False)
    eos: list[int] = []
    for source in (config, generation):
        value = source.get("eos_token_id")
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and not isinstance(t, bool) and t not in eos:
                eos.append(t)
    max_len = config.get("max_position_embeddings", 2048)
    # Full attention is exact only inside a sliding window: cap the length there.
    window = config.get("sliding_window")
    if window and (config.get("model_type") == "mistral" or config.get("use_sliding_window")):
        max_len = min(max_len, window)
    vocab = config.get("vocab_size", default_vocab_size)
    if vocab is None:
        raise ValueError(f"{folder / 'config.json'} lacks the field 'vocab_size'")
    return ModelLimits(int(vocab), int(max_len), tuple(eos))


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ValueError(f"model folder {str(path.parent)!r} has no {path.name}")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
