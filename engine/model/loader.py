"""Build a model from an HF safetensors folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.engine.config import ModelConfig
from pdserve.engine.cpu_kernels import cpu_kernels
from pdserve.engine.model.cpu_linear import optimize_linears
from pdserve.engine.model.llama import LlamaForCausalLM


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model folder {str(folder)!r} has no *.safetensors weights")
    return files


def load_model(
    cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """Construct the model without initialising weights, then load every parameter.

    Raises ValueError naming the folder and the first missing or misshapen tensors.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    loaded: dict[str, torch.Tensor] = {}
    folder = Path(cfg.path)
    for file in safetensors_files(folder):
        if not file.is_file():
            raise ValueError(f"model folder {str(folder)!r} lacks the weight shard {file.name}")
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in expected:
                    loaded[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(
            f"model folder {str(folder)!r} is missing {len(missing)} weights, e.g. {missing[:3]}"
        )
    for name, tensor in loaded.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"weight {name} in {str(folder)!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    on_cpu = torch.device(device).type == "cpu" and dtype == torch.float32
    kernels = cpu_kernels() if on_cpu else None
    model.fuse(kernels)
    if on_cpu:
        optimize_linears(model, kernels)
    return model.eval()
