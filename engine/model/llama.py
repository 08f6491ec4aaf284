"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

Reads top to bottom: RoPE, RMSNorm, attention, MLP, decoder layer, model. Parameter names
equal the HF checkpoint names, so HF safetensors load without a mapping table; after loading,
`fuse()` joins q/k/v and gate/up into one linear each (as vLLM does), so a step runs one GEMM
where it would run three or two. Tokens are flat (`[num_tokens, ...]`) across the sequences
of a step; the attention backend and its per-step metadata know where one sequence ends and
the next begins. Elementwise work goes through `FusedOps` (engine.model.ops).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.attention import AttentionBackend
from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.model.ops import FusedOps

# Called once per layer as soon as that layer's K and V for the step's tokens are in the
# cache: (layer index, k, v), k and v `[num_tokens, num_kv_heads, head_dim]`.
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    # Explicit CPU: the model is constructed under the meta device.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos and sin of each position's angles, float32 `[num_tokens, head_dim / 2]`."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear computing the outputs of `parts` side by side (one GEMM instead of several)."""
    weight = torch.cat([p.weight.detach() for p in parts])
    biases = [p.bias for p in parts]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if biases[0] is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


class RMSNorm(nn.Module):
    """Holds the checkpoint's norm weight and eps; the computation is FusedOps'."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Attention(nn.Module):
    """q/k/v exist under their checkpoint names until `fuse()` joins them into `qkv_proj`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too.
        o_bias = bias and cfg.model_type != "qwen2"
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)

    def fuse(self) -> None:
        self.qkv_proj = _fused_linear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, ops, cos, sin, layer_idx, kv_cache, slot_mapping, backend, meta, hook):
        n, d = x.shape[0], self.head_dim
        q_width, kv_width = self.num_heads * d, self.num_kv_heads * d
        qkv = ops.rotary(self.qkv_proj(x), cos, sin, self.num_heads + self.num_kv_heads, d)
        q = qkv[:, :q_width].reshape(n, self.num_heads, d)
        k = qkv[:, q_width:q_width + kv_width].reshape(n, self.num_kv_heads, d)
        v = qkv[:, q_width + kv_width:].reshape(n, self.num_kv_heads, d)
        k_cache, v_cache = kv_cache.layer(layer_idx)
        k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k)
        v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v)
        if hook is not None:
            hook(layer_idx, k, v)
        o = backend.forward(q, k, v, k_cache, v_cache, meta)  # [n, num_heads, head_dim]
        return self.o_proj(o.reshape(n, -1))


class MLP(nn.Module):
    """gate/up exist under their checkpoint names until `fuse()` joins them into `gate_up_proj`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def fuse(self) -> None:
        self.gate_up_proj = _fused_linear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, ops, *attn_args):
        """Takes and returns (the last sublayer's output, the residual stream before it); the
        residual add happens inside the next norm, where it is fused with it."""
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, ops.rms_norm(x, norm.weight, norm.eps)
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, ops, *attn_args)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # given its (uninitialised) weight, Embedding skips its random init, which on the
        # meta device costs ~1.8 s at a process's first call (torch's Python reference ops)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A plain attribute, not a buffer: the model is built on the meta device and loaded.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.ops = FusedOps(None)

    def fuse(self, kernels=None) -> None:
        """After loading: join q/k/v and gate/up into single linears, and run the elementwise
        ops through `kernels` (engine.cpu_kernels) where they apply."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.ops = FusedOps(kernels)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: PagedKVCache,
        slot_mapping: torch.Tensor,  # [num_tokens] cache slot of each token
        backend: AttentionBackend,
        meta: object,
        hook: LayerKVHook | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, self.ops, cos, sin, i, kv_cache, slot_mapping,
                                backend, meta, hook)
        norm = self.model.norm
        return self.ops.add_rms_norm(x, residual, norm.weight, norm.eps)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [num_rows, vocab_size]
