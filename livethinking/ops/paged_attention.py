"""Decode attention over a paged KV pool: one new query per sequence, keys read through
each sequence's block table.

    out[b, h] = Σ_{s < ctx[b]} softmax_s(scale · q[b, h] · k_s) · v_s,
    k_s = k_pool[block_tables[b, s // BS], s % BS, h // (Hq / Hkv)]   (v_s likewise)

CUDA runs the split-K Triton kernel of ``livethinking.kernels.paged_attention`` (no gather;
each row reads only its own context; no host sync, so CUDA graphs can capture it). CPU runs
the C++ op ``torch.ops.livethinking.paged_decode_attention`` (``csrc/cpu``): the same
in-place reads, two passes over each row's context per kv head, fp32 sums (fp64 for fp64),
threads over (row, kv head), an AVX2 + FMA path for float32 with head_dim % 8 == 0; with
the pool read from memory as at decode it measured 3.4-9.1× the gather + SDPA below at
16-256 rows × 64-512 tokens (``benchmarks/bench_paged_attention.py``). ``use_kernel=False`` is that PyTorch path: gather every row's
blocks, mask the keys at or past its context (zeroed, so whatever the pool holds there —
stale, NaN — never reaches the output) and one SDPA; ``use_kernel=True`` runs the Triton
kernel on CPU too, under the Triton interpreter. No path has a backward (inference only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from livethinking import _extension
from livethinking.kernels import paged_attention as triton_paged

__all__ = ["paged_decode_attention"]


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           scale: float | None = None, use_kernel: bool | None = None
                           ) -> torch.Tensor:
    """Attention of q (B, Hq, D) over each row's paged context -> (B, Hq, D) in q's dtype.

    k_pool, v_pool (blocks, BS, Hkv, D), Hq a multiple of Hkv (grouped-query attention);
    block_tables (B, max_blocks) int, context_lens (B,) int, each in [1, max_blocks · BS];
    table entries past a row's context are never read. ``scale`` defaults to D^-1/2.
    ``use_kernel``: None picks the Triton kernel on CUDA and the C++ op on CPU; True the
    Triton kernel (on CPU under the interpreter); False the PyTorch gather + SDPA.
    """
    native = use_kernel is None and isinstance(q, torch.Tensor) and q.device.type == "cpu"
    _check(q, k_pool, v_pool, block_tables, context_lens, scale, check_values=not native)
    if native:  # the C++ op checks the context lengths and the table entries it reads
        _extension.require_compiled(q.device)
        dim = q.shape[-1]
        out = torch.ops.livethinking.paged_decode_attention(
            q.to(k_pool.dtype), k_pool, v_pool, block_tables, context_lens,
            dim ** -0.5 if scale is None else float(scale))
        return out.to(q.dtype)
    if q.is_cuda if use_kernel is None else use_kernel:
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("use_kernel=True on CPU tensors needs the Triton interpreter "
                             "(TRITON_INTERPRET=1 before triton is imported)")
        return triton_paged.paged_decode_attention(q, k_pool, v_pool, block_tables,
                                                   context_lens, scale=scale)
    return _paged_decode_torch(q, k_pool, v_pool, block_tables, context_lens, scale)


def _paged_decode_torch(q, k_pool, v_pool, block_tables, context_lens, scale):
    batch, heads, dim = q.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    max_blocks = block_tables.shape[1]
    ctx = context_lens.long()[:, None]  # (B, 1)
    live_block = torch.arange(max_blocks, device=q.device)[None, :] * block_size < ctx
    tables = block_tables.long().masked_fill(~live_block, 0)  # (B, max_blocks): no stray ids
    key_ok = torch.arange(max_blocks * block_size, device=q.device)[None, :] < ctx  # (B, S)
    past = ~key_ok[:, :, None, None]  # (B, S, 1, 1)
    k = k_pool[tables].view(batch, -1, kv_heads, dim).masked_fill_(past, 0)  # (B, S, Hkv, D),
    v = v_pool[tables].view(batch, -1, kv_heads, dim).masked_fill_(past, 0)  # gathered copies
    k, v = k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2)  # (B, Hkv, S, D)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=key_ok[:, None, None, :],
                                         scale=scale, enable_gqa=heads != kv_heads)
    return out[:, :, 0]  # (B, Hq, D)


def _check(q, k_pool, v_pool, block_tables, context_lens, scale, check_values: bool = True
           ) -> None:
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool),
                    ("block_tables", block_tables), ("context_lens", context_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    triton_paged.check_paged_decode_inputs(q, k_pool, v_pool, block_tables, context_lens)
    batch, num_blocks, block_size = q.shape[0], k_pool.shape[0], k_pool.shape[1]
    if not q.is_floating_point() or k_pool.dtype != v_pool.dtype or not k_pool.is_floating_point():
        raise TypeError(f"q, k_pool and v_pool must be floating, the pools of one dtype; got "
                        f"{q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if q.is_cuda or batch == 0 or not check_values:  # device values: no host sync
        return
    limit = block_tables.shape[1] * block_size
    if context_lens.min() < 1 or context_lens.max() > limit:
        raise ValueError(f"context_lens must lie in [1, max_blocks · BS = {limit}], got values "
                         f"in [{context_lens.min().item()}, {context_lens.max().item()}]")
    live = (torch.arange(block_tables.shape[1])[None, :] * block_size
            < context_lens.long()[:, None])
    used = block_tables[live]
    if used.numel() and (used.min() < 0 or used.max() >= num_blocks):
        raise ValueError(f"block_tables entries within a row's context must lie in "
                         f"[0, {num_blocks}), got values in [{used.min().item()}, "
                         f"{used.max().item()}]")
