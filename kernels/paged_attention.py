"""Decode attention over a paged KV cache in Triton (one new token per sequence), split-K.

Math. For sequence b and query head h, with kv head g = h // (Hq / Hkv) (grouped-query
attention), the keys of positions s < ctx[b] live in the pool at
``pool[tables[b, s // BS], s % BS, g]`` and

    out[b, h] = Σ_s softmax_s(scale · q[b, h] · k_s) · v_s

What it saves. Gathering each sequence's blocks into a dense (B, Hkv, S, D) tensor before
a masked SDPA writes and re-reads the whole context once more per layer, and under CUDA
graphs (static shapes) the gather spans the longest context the graph allows, not the
real one. Here each program reads its blocks straight from the pool through the block
table, only up to the row's own context length (read on the device: no host sync, so the
call can be captured in a CUDA graph), and all query heads of one kv head share each K/V
load. Decode is bound by reading K/V, so the context is split into ``num_splits`` ranges
(flash-decoding): grid (B, Hkv, splits) keeps the GPU busy even for one long sequence.
Each split keeps an online softmax (running max m, sum l, weighted V acc) in fp32; the
splits are merged as out = Σ e^{m_i − M} acc_i / Σ e^{m_i − M} l_i.

Layout: q (B, Hq, D); k_pool, v_pool (blocks, BS, Hkv, D) with any strides on the first
three dims and unit stride on D; block_tables (B, max_blocks) int; context_lens (B,) int,
each in [1, max_blocks · BS]. Table entries past a row's context are never read.
"""

import torch
import triton
import triton.language as tl

__all__ = ["check_paged_decode_inputs", "paged_decode_attention",
           "paged_decode_attention_reference"]


# q: (B, Hq, D); k/v pool: (blocks, BS, Hkv, D); tables: (B, max_blocks); ctx: (B,)
# partial outputs m, l: (B, splits, Hq); acc: (B, splits, Hq, D), fp32
@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, m_ptr, l_ptr, acc_ptr,
                         stride_qb, stride_qh, stride_kn, stride_ks, stride_kh,
                         stride_vn, stride_vs, stride_vh, stride_tb, num_heads, num_splits,
                         blocks_per_split, scale,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BS: tl.constexpr,
                         D: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    num_blocks = tl.cdiv(ctx, BS)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)

    head_in_group = tl.arange(0, GROUP_PAD)
    head_ok = head_in_group < GROUP
    heads = g * GROUP + head_in_group  # (G,)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    slot = tl.arange(0, BS)
    for blk in range(first, last):
        block = tl.load(tables_ptr + b * stride_tb + blk).to(tl.int64)
        key_ok = blk * BS + slot < ctx  # (BS,)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + block * stride_kn + slot[:, None] * stride_ks + g * stride_kh
                    + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # (BS, D)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, BS)
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: slot 0 of a block is valid
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block * stride_vn + slot[:, None] * stride_vs + g * stride_vh
                    + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    row = (b * num_splits + split) * num_heads + heads
    tl.store(m_ptr + row, m, mask=head_ok)
    tl.store(l_ptr + row, l, mask=head_ok)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=head_ok[:, None] & d_ok[None, :])


def check_paged_decode_inputs(q, k_pool, v_pool, block_tables, context_lens) -> None:
    """ValueError naming the argument when the shapes, devices or strides do not fit."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be (blocks, BS, Hkv, D), got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    batch, heads, dim = q.shape
    kv_heads = k_pool.shape[2]
    if k_pool.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"q (B, Hq={heads}, D={dim}) does not fit a pool with Hkv={kv_heads}, "
                         f"D={k_pool.shape[3]} (Hq must be a multiple of Hkv)")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be (B={batch}, max_blocks), got "
                         f"{tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be (B={batch},), got {tuple(context_lens.shape)}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if k_pool.stride(3) != 1 or v_pool.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q, k_pool and v_pool need unit stride on the head dimension")


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           scale: float | None = None, num_splits: int | None = None
                           ) -> torch.Tensor:
    """Attention of one new query per sequence over its paged context -> (B, Hq, D) in q's
    dtype. ``scale`` defaults to D^-1/2; ``num_splits`` (ranges of the context processed
    in parallel) defaults to enough programs to fill a GPU, chosen from shapes only."""
    check_paged_decode_inputs(q, k_pool, v_pool, block_tables, context_lens)
    batch, heads, dim = q.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = heads // kv_heads
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = max(1, min(max_blocks, -(-256 // max(1, batch * kv_heads))))
    num_splits = max(1, min(num_splits, max(1, max_blocks)))
    blocks_per_split = -(-max_blocks // num_splits)
    if batch == 0:
        return q.new_empty(q.shape)
    out_shape = (batch, num_splits, heads)
    m = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    l = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    acc = torch.empty(out_shape + (dim,), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q, k_pool, v_pool, block_tables, context_lens, m, l, acc,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), block_tables.stride(0),
        heads, num_splits, blocks_per_split, dim ** -0.5 if scale is None else scale,
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BS=block_size, D=dim,
        D_PAD=max(16, triton.next_power_of_2(dim)))
    weight = torch.exp(m - m.amax(dim=1, keepdim=True))  # (B, splits, Hq); 0 for empty splits
    out = (acc * weight[..., None]).sum(dim=1) / (l * weight).sum(dim=1)[..., None]
    return out.to(q.dtype)


def paged_decode_attention_reference(q, k_pool, v_pool, block_tables, context_lens, *,
                                     scale=None):
    """Plain PyTorch, one sequence at a time, in float64: gather the context, softmax."""
    batch, heads, dim = q.shape
    block_size, kv_heads = k_pool.shape[1], k_pool.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(batch):
        ctx = int(context_lens[b])
        blocks = block_tables[b, :-(-ctx // block_size)].long()
        k = k_pool[blocks].reshape(-1, kv_heads, dim)[:ctx].double()  # (ctx, Hkv, D)
        v = v_pool[blocks].reshape(-1, kv_heads, dim)[:ctx].double()
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # (ctx, Hq, D)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,shd->hs", q[b].double() * scale, k)
        out[b] = torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), v)
    return out
