"""Grouped-query self-attention of Qwen3 with per-head q/k RMSNorm and RoPE.

Three ways in, chosen by :class:`AttentionInputs`:
- plain causal (B, T) rows: SDPA with ``is_causal``;
- packed documents in one row (``cu_seqlens``): attention never crosses a document;
  flash-attn's varlen kernel when it is importable (CUDA, fp16/bf16), otherwise SDPA with
  a block-diagonal causal mask;
- a KV cache: keys/values go through :meth:`KVCache.update`, which returns what to
  attend over and the mask; an :class:`AttendingKVCache` (the engine's paged cache, with
  a paged decode op) does both in :meth:`AttendingKVCache.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from livethinking.model.kv_cache import AttendingKVCache, KVCache
from livethinking.model.layers import RMSNorm, apply_rotary
from livethinking.ops.linear import linear

try:  # optional; never required
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None

__all__ = ["Attention", "AttentionInputs", "packed_causal_mask"]


@dataclass(slots=True)
class AttentionInputs:
    """What every layer's attention needs besides the hidden states."""

    cos: torch.Tensor  # (B, 1, T, D): broadcast over heads
    sin: torch.Tensor  # (B, 1, T, D), signed (RotaryEmbedding)
    cu_seqlens: torch.Tensor | None = None  # (docs + 1,) int32, packed rows only
    max_seqlen: int = 0
    mask: torch.Tensor | None = None  # (1, 1, T, T) bool for packed SDPA
    kv_cache: KVCache | AttendingKVCache | None = None
    positions: torch.Tensor | None = None  # (B, T), with kv_cache


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, 1, total, total) bool: token i sees token j iff same document and j <= i."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)  # (total,)
    same = doc[:, None] == doc[None, :]
    return (same & (idx[None, :] <= idx[:, None]))[None, None]


def use_flash_varlen(x: torch.Tensor) -> bool:
    return (flash_attn_varlen_func is not None and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16))


def _project(layer: nn.Linear, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """layer(x); in the engine's steps (``fast``) by ``ops.linear``'s skinny GEMM (the
    module's own call otherwise, its hooks included)."""
    return linear(x, layer.weight, layer.bias, fast=True) if fast else layer(x)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        batch, steps, _ = x.shape
        fast = inputs.kv_cache is not None  # the engine's steps: its inference kernels
        q = self.q_norm(_project(self.q_proj, x, fast).view(batch, steps, -1, self.head_dim),
                        fast).transpose(1, 2)
        k = self.k_norm(_project(self.k_proj, x, fast).view(batch, steps, -1, self.head_dim),
                        fast).transpose(1, 2)
        v = _project(self.v_proj, x, fast).view(batch, steps, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)  # (B, heads, T, D)

        if isinstance(inputs.kv_cache, AttendingKVCache):
            out = inputs.kv_cache.attend(self.layer_idx, q, k, v, inputs.positions)
        elif inputs.kv_cache is not None:
            k, v, mask = inputs.kv_cache.update(self.layer_idx, k, v, inputs.positions)
            out = self._sdpa(q, k, v, mask, is_causal=False)
        elif inputs.cu_seqlens is not None and use_flash_varlen(q):
            out = flash_attn_varlen_func(
                q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                inputs.cu_seqlens, inputs.cu_seqlens, inputs.max_seqlen, inputs.max_seqlen,
                causal=True)  # (T, heads, D)
            return self.o_proj(out.reshape(batch, steps, -1))
        elif inputs.cu_seqlens is not None:
            out = self._sdpa(q, k, v, inputs.mask, is_causal=False)
        else:
            out = self._sdpa(q, k, v, None, is_causal=True)
        return _project(self.o_proj, out.transpose(1, 2).reshape(batch, steps, -1), fast)

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                              is_causal=is_causal,
                                              enable_gqa=self.num_kv_heads != self.num_heads)
