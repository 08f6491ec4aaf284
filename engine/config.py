"""Frozen configuration of the engine: model shape, KV cache, scheduler.

Everything here is decided before the engine starts and never changes afterwards. Values
discovered at start-up (how many KV blocks fit in memory) live in `CacheLayout`, a separate
result object, so no config is mutated after construction.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdserve.protocol import ModelLimits, read_model_limits

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type == "llama3"` in the HF config)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from an HF `config.json`."""

    path: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_model_len: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def kv_bytes_per_token(self, element_size: int) -> int:
        """KV bytes one token occupies across all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `path/config.json` (and `generation_config.json` for EOS ids).

        Raises ValueError naming the problem for a missing or broken folder and for an
        architecture the engine does not implement.
        """
        folder = Path(path)
        config_file = folder / "config.json"
        if not folder.is_dir():
            raise ValueError(f"model folder {str(folder)!r} does not exist")
        if not config_file.is_file():
            raise ValueError(f"model folder {str(folder)!r} has no config.json")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r} in {config_file}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            return cls._from_dict(str(folder), model_type, raw, read_model_limits(folder))
        except KeyError as e:
            raise ValueError(f"{config_file} lacks the field {e.args[0]!r}") from e

    @classmethod
    def _from_dict(cls, path: str, model_type: str, raw: dict,
                   limits: ModelLimits) -> ModelConfig:
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        theta, scaling = _read_rope(raw)
        return cls(
            path=path,
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_model_len=limits.max_model_len,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", model_type == "qwen2"),
            mlp_bias=raw.get("mlp_bias", False),
            rope_scaling=scaling,
            eos_token_ids=limits.eos_token_ids,
        )


def _read_rope(raw: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks` wins over `memory_bytes` when both are given."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int = 1 << 30
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


class EngineMode(enum.Enum):
    """Which phases of a request this engine runs (DESIGN §4)."""

    MIXED = "mixed"  # colocated: prefill and decode on one worker
    PREFILL_ONLY = "prefill"  # run prompts, emit the first token, hand the KV off
    DECODE_ONLY = "decode"  # receive prompt KV from outside, then decode


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: tokens per step (the chunked-prefill budget) and sequences.

    `prefill_pack_tokens` (prefill-only engines): a step that already computes a prompt
    takes another only whole and only while the step stays within this many tokens, so
    short prompts share a step and a long one runs alone. Every prompt in a step gets its
    first token when the whole step ends; where a step costs the sum of its tokens (a CPU
    past ~128 tokens) packing gains nothing and gives the first prompt the others' time.
    None: pack up to `max_num_batched_tokens` (a GPU, whose step time grows little with
    its tokens).
    """

    mode: EngineMode = EngineMode.MIXED
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    prefill_pack_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.prefill_pack_tokens is not None and self.prefill_pack_tokens < 1:
            raise ValueError(f"prefill_pack_tokens must be >= 1, got {self.prefill_pack_tokens}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # CPUs here have no bf16 matrix units: fp32 is both faster and exact there.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = field(default_factory=default_device)
    dtype: torch.dtype | None = None
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype or default_dtype(self.device)


@dataclass(frozen=True)
class CacheLayout:
    """What the KV cache turned out to be once memory was sized at start-up."""

    num_blocks: int
    block_size: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size
