"""Attention over the paged KV cache: torch SDPA everywhere, flash-attn on CUDA when present.

A step's tokens arrive flat (`[num_tokens, heads, head_dim]`), sequence after sequence. Each
backend turns the step's sequences into its own metadata once per step (`build`), and every
layer then calls `forward` with that metadata: nothing about the batch is global.

The new tokens' K/V are written into the cache before `forward` runs, so a backend reads a
sequence's whole context (cached prefix + new tokens) from the cache alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function


@dataclass(frozen=True)
class SeqSlice:
    """The tokens of one sequence computed this step: positions [start, start + num_new)."""

    start: int
    num_new: int
    block_ids: list[int]

    @property
    def context_len(self) -> int:
        return self.start + self.num_new


class AttentionBackend(ABC):
    @abstractmethod
    def build(self, seqs: list[SeqSlice], block_size: int, device: torch.device) -> object:
        """Per-step metadata for `forward`. Called once per step, before the layers run."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], already in the cache
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: object,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Causal attention of each new token over its sequence's context."""


@dataclass(frozen=True)
class _SdpaPrefill:
    q_start: int
    q_end: int
    block_table: torch.Tensor | None  # None: no cached prefix, attend within the chunk
    context_len: int
    mask: torch.Tensor | None  # [num_new, context_len] bool, True = attend
    num_seqs: int = 1  # fresh prompts of equal length run as one batched call


@dataclass(frozen=True)
class SdpaMetadata:
    prefills: list[_SdpaPrefill]
    decode_index: torch.Tensor  # [num_decodes] flat token index of each decode query
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]
    decode_context_len: int  # exact context length when there is a single decode
    decode_lens: torch.Tensor  # [num_decodes] context length of each decode


class SdpaBackend(AttentionBackend):
    """torch.nn.functional.scaled_dot_product_attention. Decode queries (one new token after
    a prefix) of a step are batched into one padded call; each prefill chunk gets its own.

    With `decode_kernel` (engine.cpu_kernels, float32 CPU only) decode queries read K and V
    in place from the paged cache instead of gathering them first.
    """

    def __init__(self, decode_kernel=None):
        self.decode_kernel = decode_kernel

    def build(self, seqs: list[SeqSlice], block_size: int, device: torch.device) -> SdpaMetadata:
        prefills, decode_index, decode_tables, decode_lens = [], [], [], []
        offset = 0
        for s in seqs:
            if s.num_new == 1 and s.start > 0:
                decode_index.append(offset)
                decode_tables.append(s.block_ids)
                decode_lens.append(s.context_len)
            elif s.start == 0:
                last = prefills[-1] if prefills else None
                if (last is not None and last.block_table is None and last.q_end == offset
                        and last.context_len == s.num_new):
                    prefills[-1] = _SdpaPrefill(last.q_start, offset + s.num_new, None,
                                                s.num_new, None, last.num_seqs + 1)
                else:
                    prefills.append(
                        _SdpaPrefill(offset, offset + s.num_new, None, s.num_new, None))
            else:
                ctx = s.context_len
                q_pos = torch.arange(s.start, ctx, device=device)
                mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
                table = _pad_tables([s.block_ids], device)[0]
                prefills.append(_SdpaPrefill(offset, offset + s.num_new, table, ctx, mask))
            offset += s.num_new
        tables = _pad_tables(decode_tables, device)
        mask = None
        if len(decode_lens) > 1:
            max_len = tables.shape[1] * block_size
            lens = torch.tensor(decode_lens, device=device)
            mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None]
        return SdpaMetadata(
            prefills=prefills,
            decode_index=torch.tensor(decode_index, dtype=torch.long, device=device),
            decode_block_table=tables,
            decode_mask=mask,
            decode_context_len=decode_lens[0] if len(decode_lens) == 1 else 0,
            decode_lens=torch.tensor(decode_lens, dtype=torch.long, device=device),
        )

    def forward(self, q, k, v, k_cache, v_cache, meta: SdpaMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        # NOTE: 4-D inputs (a batch dim of 1) select torch's fused CPU kernel; 3-D ones fall
        # back to the unfused math path, which is several times slower.
        for p in meta.prefills:
            if p.block_table is None:
                # [num_seqs, heads, n, head_dim]: one call per run of equal-length prompts
                qs, ks, vs = (t[p.q_start : p.q_end].unflatten(0, (p.num_seqs, -1))
                              .transpose(1, 2) for t in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                out[p.q_start : p.q_end] = o.transpose(1, 2).flatten(0, 1)
                continue
            qs = q[p.q_start : p.q_end].transpose(0, 1)[None]  # [1, heads, n, head_dim]
            ks = k_cache[p.block_table].flatten(0, 1)[: p.context_len].transpose(0, 1)[None]
            vs = v_cache[p.block_table].flatten(0, 1)[: p.context_len].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, enable_gqa=True)
            out[p.q_start : p.q_end] = o[0].transpose(0, 1)
        if meta.decode_index.numel() and self._kernel_fits(q, k_cache):
            with record_function("pdserve::paged_decode_attention"):  # named in profiles
                out[meta.decode_index] = self.decode_kernel.paged_decode_attention(
                    q[meta.decode_index], k_cache, v_cache, meta.decode_block_table,
                    meta.decode_lens, q.shape[-1] ** -0.5)
        elif meta.decode_index.numel():
            qd = q[meta.decode_index][:, :, None]  # [batch, heads, 1, head_dim]
            batch = meta.decode_block_table.shape[0]
            flat = meta.decode_block_table.reshape(-1)
            # index_select copies whole blocks; it is ~1.6x faster than advanced indexing.
            kd = k_cache.index_select(0, flat).view(batch, -1, *k_cache.shape[2:])
            vd = v_cache.index_select(0, flat).view(batch, -1, *v_cache.shape[2:])
            if meta.decode_context_len:
                kd = kd[:, : meta.decode_context_len]
                vd = vd[:, : meta.decode_context_len]
            o = F.scaled_dot_product_attention(
                qd, kd.transpose(1, 2), vd.transpose(1, 2),
                attn_mask=meta.decode_mask, enable_gqa=True,
            )
            out[meta.decode_index] = o[:, :, 0]
        return out


    def _kernel_fits(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (self.decode_kernel is not None and q.device.type == "cpu"
                and q.dtype == torch.float32 and k_cache.is_contiguous())


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block tables padded with block 0 (masked out) to `[num_seqs, max_blocks]`."""
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.long, device=device).reshape(len(tables), width)


@dataclass(frozen=True)
class FlashMetadata:
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length of each sequence
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    is_pure_decode: bool


class FlashAttentionBackend(AttentionBackend):
    """flash-attn 2 over the paged cache (`block_table`); needs CUDA and a block size that is
    a multiple of 256, as flash-attn's paged kernels require."""

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def build(self, seqs: list[SeqSlice], block_size: int, device: torch.device) -> FlashMetadata:
        if block_size % 256:
            raise ValueError(f"flash-attn paged attention needs block_size % 256 == 0, "
                             f"got {block_size}")
        q_lens = [s.num_new for s in seqs]
        k_lens = [s.context_len for s in seqs]
        i32 = dict(dtype=torch.int32, device=device)
        return FlashMetadata(
            cu_seqlens_q=torch.tensor([0] + _cumsum(q_lens), **i32),
            cu_seqlens_k=torch.tensor([0] + _cumsum(k_lens), **i32),
            seq_lens=torch.tensor(k_lens, **i32),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
            block_table=_pad_tables([s.block_ids for s in seqs], device).to(torch.int32),
            is_pure_decode=all(n == 1 for n in q_lens),
        )

    def forward(self, q, k, v, k_cache, v_cache, meta: FlashMetadata) -> torch.Tensor:
        if meta.is_pure_decode:
            o = self._with_kvcache(
                q[:, None], k_cache, v_cache,
                cache_seqlens=meta.seq_lens, block_table=meta.block_table, causal=True,
            )
            return o[:, 0]
        return self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
            causal=True, block_table=meta.block_table,
        )


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def flash_attn_available(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: str, block_size: int, dtype: torch.dtype) -> AttentionBackend:
    """flash-attn on CUDA when it imports and the block size suits it; SDPA otherwise, with
    the in-place paged decode kernel on a float32 CPU engine when it builds."""
    if flash_attn_available(device) and block_size % 256 == 0:
        return FlashAttentionBackend()
    if device == "cpu" and dtype == torch.float32:
        from pdserve.engine.cpu_kernels import cpu_kernels

        return SdpaBackend(decode_kernel=cpu_kernels())
    return SdpaBackend()
