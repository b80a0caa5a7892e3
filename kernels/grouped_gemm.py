"""Grouped GEMM for mixture-of-experts layers: every group of rows has its own weight.

Math. ``a`` is (M, K) with its rows sorted by group, ``b`` is (G, N, K) and
``group_offsets`` is (G + 1,) with ``off[0] = 0``, ``off[G] = M`` and ``off`` non-decreasing
(a precondition, not checked on the device: checking would need a host synchronisation).
Group g owns rows ``[off[g], off[g + 1])`` and

    c[m, :] = a[m, :] @ b[g].T                    for off[g] <= m < off[g + 1]

The gradients are two more grouped products:

    da[m, :] = dc[m, :] @ b[g]                    (same kernel, b read through its strides as (G, K, N))
    db[g]    = dc[off[g]:off[g+1]].T @ a[off[g]:off[g+1]]   (zero for a group with no rows)

What it saves. The usual MoE path pads every expert's rows to a multiple of the tile
height (up to G * (BLOCK_M - 1) extra rows, copied in and out) or runs G separate
matmuls (G launches and a host synchronisation to learn the group sizes). Here a tile
of BLOCK_M rows never crosses a group boundary and a group of r rows gets
ceil(r / BLOCK_M) tiles, so nothing is padded or copied. The tile counts are summed on
the device (``torch.cumsum``) and the grid is sized from shapes alone: since
ceil(r / BM) <= (r + BM - 1) / BM, the tiles number at most (M + G * (BM - 1)) // BM,
which never exceeds cdiv(M, BM) + G. Each program finds its group by a binary search
over the tile prefix sum; programs past the last tile return at once. The whole call
is one launch (forward) or two (backward) with no ``.item()``, so it can be captured in
a CUDA graph.

The weight gradient is a plain tiled reduction: one program per (g, N tile, K tile)
walks its group's rows in BLOCK_M chunks in a fixed order, accumulating in fp32, so it
is deterministic (no atomics) and writes exact zeros for groups with no rows.

Accumulation is fp32 for every input dtype. On CUDA, fp32 inputs are multiplied with
``input_precision="ieee"`` (no TF32), bf16/fp16 on the tensor cores. Under the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors) bf16 ``tl.dot`` is computed wrongly by
the interpreter itself: use fp32 or fp16 there.

Invalid offsets (decreasing, off[G] != M) give wrong values but no out-of-bounds
access: every row index is also masked to [0, M).
"""

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "CONFIGS",
    "GroupedGemmConfig",
    "TileConfig",
    "choose_config",
    "grouped_gemm",
    "grouped_gemm_forward",
    "grouped_gemm_input_grad",
    "grouped_gemm_reference",
    "grouped_gemm_weight_grad",
]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _find_group(tile_offsets_ptr, tile, num_groups, search_steps):
    # tile_offsets: (G + 1,), non-decreasing, tile_offsets[0] = 0 and tile < tile_offsets[G].
    # Returns the largest g < G with tile_offsets[g] <= tile: the group that owns the tile
    # (empty groups share their start with the next group, so they are never chosen).
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), 0, tl.int32) + num_groups
    for _ in range(search_steps):  # ceil(log2(G)) halvings keep tile_offsets[lo] <= tile < tile_offsets[hi]
        mid = (lo + hi) // 2
        go_right = tl.load(tile_offsets_ptr + mid) <= tile
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _grouped_gemm_rows_kernel(
    a_ptr, b_ptr, c_ptr, group_offsets_ptr, tile_offsets_ptr,
    M, N, K, num_groups, search_steps,
    stride_am, stride_ak,
    stride_bg, stride_bn, stride_bk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):
    # a: (M, K)   b: (G, N, K) through (stride_bg, stride_bn, stride_bk)   c: (M, N)
    # group_offsets, tile_offsets: (G + 1,)
    # grid: (max tiles over all groups, cdiv(N, BLOCK_N))
    # c[rows of g] = a[rows of g] @ b[g].T; with b's last two strides swapped this is dc @ b[g].
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile >= tl.load(tile_offsets_ptr + num_groups):
        return
    g = _find_group(tile_offsets_ptr, tile, num_groups, search_steps)
    tile_in_group = (tile - tl.load(tile_offsets_ptr + g)).to(tl.int64)
    row_start = tl.load(group_offsets_ptr + g).to(tl.int64) + tile_in_group * BLOCK_M
    row_end = tl.minimum(tl.load(group_offsets_ptr + g + 1).to(tl.int64), M)

    rows = row_start + tl.arange(0, BLOCK_M)  # int64: M * K may exceed 2**31
    row_mask = (rows >= 0) & (rows < row_end)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak          # (BLOCK_M, BLOCK_K)
    b_ptrs = (b_ptr + g.to(tl.int64) * stride_bg
              + ks[:, None] * stride_bk + cols[None, :] * stride_bn)             # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_gemm_weight_grad_kernel(
    dc_ptr, a_ptr, db_ptr, group_offsets_ptr,
    M, N, K,
    stride_dcm, stride_dcn,
    stride_am, stride_ak,
    stride_dbg, stride_dbn, stride_dbk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):
    # dc: (M, N)   a: (M, K)   db: (G, N, K)   group_offsets: (G + 1,)
    # grid: (G, cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))
    # db[g] = dc[rows of g].T @ a[rows of g], the rows walked in BLOCK_M chunks in order.
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row_start = tl.maximum(tl.load(group_offsets_ptr + g).to(tl.int64), 0)
    row_end = tl.minimum(tl.load(group_offsets_ptr + g + 1).to(tl.int64), M)
    num_chunks = tl.cdiv(tl.maximum(row_end - row_start, 0), BLOCK_M).to(tl.int32)

    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = cols_n < N
    k_mask = cols_k < K
    ms = tl.arange(0, BLOCK_M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for chunk in range(0, num_chunks):  # an empty group runs no iteration and stores zeros
        rows = row_start + chunk * BLOCK_M + ms
        row_mask = rows < row_end
        dc = tl.load(dc_ptr + rows[:, None] * stride_dcm + cols_n[None, :] * stride_dcn,
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)        # (BLOCK_M, BLOCK_N)
        a = tl.load(a_ptr + rows[:, None] * stride_am + cols_k[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)         # (BLOCK_M, BLOCK_K)
        if FP32_IEEE:
            acc = tl.dot(tl.trans(dc), a, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dc), a, acc)

    db_ptrs = (db_ptr + g.to(tl.int64) * stride_dbg
               + cols_n[:, None] * stride_dbn + cols_k[None, :] * stride_dbk)
    tl.store(db_ptrs, acc.to(db_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- configs


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class GroupedGemmConfig(NamedTuple):
    rows: TileConfig         # forward and input gradient: a BLOCK_M x BLOCK_N output tile, K loop
    weight_grad: TileConfig  # weight gradient: a BLOCK_N x BLOCK_K output tile, loop over rows by BLOCK_M


# Starting points, not tuned on hardware. "decode": a few rows per group, so the tile
# height is tl.dot's minimum (16) and the weights' stream dominates; "medium": tens of
# rows; "prefill": hundreds. "interpret": small blocks for the Triton interpreter on CPU.
CONFIGS: dict[str, GroupedGemmConfig] = {
    "decode": GroupedGemmConfig(TileConfig(16, 64, 128, 4, 4), TileConfig(16, 64, 64, 4, 3)),
    "medium": GroupedGemmConfig(TileConfig(64, 128, 64, 4, 4), TileConfig(32, 128, 64, 4, 3)),
    "prefill": GroupedGemmConfig(TileConfig(128, 128, 64, 8, 3), TileConfig(64, 128, 128, 8, 3)),
    "interpret": GroupedGemmConfig(TileConfig(16, 32, 32, 1, 1), TileConfig(16, 32, 32, 1, 1)),
}

# Decided at import, as triton.jit decides whether to interpret.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def choose_config(num_rows: int, num_groups: int, device: torch.device) -> GroupedGemmConfig:
    """The config for ``num_rows`` rows over ``num_groups`` groups (shapes only, no sync)."""
    if _INTERPRET or os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type == "cpu":
        return CONFIGS["interpret"]
    rows_per_group = num_rows / max(num_groups, 1)
    if rows_per_group <= 16:
        return CONFIGS["decode"]
    if rows_per_group <= 128:
        return CONFIGS["medium"]
    return CONFIGS["prefill"]


# ----------------------------------------------------------------------------- launchers

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tile_offsets(group_offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """(G + 1,) int32 prefix sum of ceil(rows_g / block_m), on the device, no sync."""
    rows = (group_offsets[1:] - group_offsets[:-1]).clamp_(min=0)
    tiles = torch.div(rows + (block_m - 1), block_m, rounding_mode="floor")
    tile_offsets = torch.zeros(group_offsets.numel(), dtype=torch.int32, device=group_offsets.device)
    tile_offsets[1:] = torch.cumsum(tiles, 0)
    return tile_offsets


def _device_guard(t: torch.Tensor):
    """Launch on t's GPU (not merely the current one); nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_out(out: torch.Tensor, shape: tuple, like: torch.Tensor, name: str) -> None:
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be a {like.dtype} tensor of shape {shape} on {like.device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _launch_rows(x: torch.Tensor, w: torch.Tensor, w_strides: tuple, n_out: int,
                 group_offsets: torch.Tensor, out, config) -> torch.Tensor:
    """out[rows of g] = x[rows of g] @ W_g, W_g (inner, n_out) read from w via w_strides =
    (group, out column, inner index)."""
    m, inner = x.shape
    num_groups = group_offsets.numel() - 1
    if out is None:
        out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, (m, n_out), x, "out")
    if m == 0 or n_out == 0:
        return out
    cfg = (config or choose_config(m, num_groups, x.device)).rows
    tile_offsets = _tile_offsets(group_offsets, cfg.block_m)
    max_tiles = (m + num_groups * (cfg.block_m - 1)) // cfg.block_m  # <= cdiv(M, BM) + G
    grid = (max_tiles, triton.cdiv(n_out, cfg.block_n))
    with _device_guard(x):
        _grouped_gemm_rows_kernel[grid](
            x, w, out, group_offsets, tile_offsets,
            m, n_out, inner, num_groups, (num_groups - 1).bit_length(),
            x.stride(0), x.stride(1),
            w_strides[0], w_strides[1], w_strides[2],
            out.stride(0), out.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            FP32_IEEE=x.dtype == torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def grouped_gemm_forward(a: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor, *,
                         out: torch.Tensor | None = None,
                         config: GroupedGemmConfig | None = None) -> torch.Tensor:
    """c (M, N): rows of group g of a (M, K) times b[g].T, b (G, N, K). No autograd and no
    argument checks (``grouped_gemm`` checks); ``out``, if given, must be contiguous."""
    a, b, group_offsets = a.contiguous(), b.contiguous(), group_offsets.contiguous()
    return _launch_rows(a, b, (b.stride(0), b.stride(1), b.stride(2)), b.shape[1],
                        group_offsets, out, config)


def grouped_gemm_input_grad(grad_out: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor, *,
                            out: torch.Tensor | None = None,
                            config: GroupedGemmConfig | None = None) -> torch.Tensor:
    """da (M, K): rows of group g of grad_out (M, N) times b[g] (N, K); b is read as
    (G, K, N) by swapping its strides, never transposed in memory."""
    grad_out, b, group_offsets = grad_out.contiguous(), b.contiguous(), group_offsets.contiguous()
    return _launch_rows(grad_out, b, (b.stride(0), b.stride(2), b.stride(1)), b.shape[2],
                        group_offsets, out, config)


def grouped_gemm_weight_grad(grad_out: torch.Tensor, a: torch.Tensor, group_offsets: torch.Tensor, *,
                             out: torch.Tensor | None = None,
                             config: GroupedGemmConfig | None = None) -> torch.Tensor:
    """db (G, N, K): db[g] = grad_out[rows of g].T @ a[rows of g]; exact zeros for empty groups."""
    grad_out, a, group_offsets = grad_out.contiguous(), a.contiguous(), group_offsets.contiguous()
    m, n = grad_out.shape
    k = a.shape[1]
    num_groups = group_offsets.numel() - 1
    if out is None:
        out = torch.empty(num_groups, n, k, dtype=a.dtype, device=a.device)
    else:
        _check_out(out, (num_groups, n, k), a, "out")
    if out.numel() == 0:
        return out
    cfg = (config or choose_config(m, num_groups, a.device)).weight_grad
    grid = (num_groups, triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
    with _device_guard(a):
        _grouped_gemm_weight_grad_kernel[grid](
            grad_out, a, out, group_offsets,
            m, n, k,
            grad_out.stride(0), grad_out.stride(1),
            a.stride(0), a.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            FP32_IEEE=a.dtype == torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


# ----------------------------------------------------------------------------- autograd


class GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group_offsets):
        a, b, group_offsets = a.contiguous(), b.contiguous(), group_offsets.contiguous()
        ctx.save_for_backward(a, b, group_offsets)
        return grouped_gemm_forward(a, b, group_offsets)

    @staticmethod
    def backward(ctx, grad_out):
        a, b, group_offsets = ctx.saved_tensors
        grad_out = grad_out.to(a.dtype).contiguous()  # contiguous also removes stride-0 gradients
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = grouped_gemm_input_grad(grad_out, b, group_offsets)
        if ctx.needs_input_grad[1]:
            grad_b = grouped_gemm_weight_grad(grad_out, a, group_offsets)
        return grad_a, grad_b, None


# ----------------------------------------------------------------------------- public API


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _validate(a, b, group_offsets) -> None:
    for t, name in ((a, "a"), (b, "b"), (group_offsets, "group_offsets")):
        _check_tensor(t, name)
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (M, K); got shape {_shape(a)}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3-D (G, N, K); got shape {_shape(b)}")
    num_groups, _, k = b.shape
    if a.shape[1] != k:
        raise ValueError(f"a is (M, K) = {_shape(a)} but b is (G, N, K) = {_shape(b)}: "
                         f"K differs ({a.shape[1]} vs {k})")
    if group_offsets.dim() != 1 or group_offsets.numel() != num_groups + 1:
        raise ValueError(f"group_offsets must be 1-D of length G + 1 = {num_groups + 1} "
                         f"(b has G={num_groups} groups); got shape {_shape(group_offsets)}")
    if a.dtype not in _DTYPES:
        raise TypeError(f"a must be float32, bfloat16 or float16; got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}; got {b.dtype}")
    if group_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_offsets must be int32 or int64; got {group_offsets.dtype}")
    for t, name in ((b, "b"), (group_offsets, "group_offsets")):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    if not (a.is_cuda or (a.device.type == "cpu" and _INTERPRET)):
        raise ValueError(f"a is on {a.device}: the kernels need CUDA tensors, or CPU tensors with "
                         f"TRITON_INTERPRET=1 set before this module is imported")
    if num_groups == 0 and a.shape[0] > 0:
        raise ValueError(f"b has no groups (G = 0) but a has M = {a.shape[0]} rows")
    if group_offsets.dtype == torch.int32 and a.shape[0] > torch.iinfo(torch.int32).max:
        raise ValueError(f"group_offsets must be int64 when a has M = {a.shape[0]} >= 2**31 rows")


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``[off[g], off[g + 1])`` of ``a`` (M, K) times ``b[g].T`` for ``b`` (G, N, K): (M, N).

    ``group_offsets`` (G + 1,) int32 or int64 must satisfy off[0] = 0, off[G] = M and be
    non-decreasing (not checked: that would synchronise with the host). a and b share a
    dtype (float32, bfloat16 or float16), which the output and gradients keep; products
    accumulate in fp32. Differentiable in a and b.
    """
    _validate(a, b, group_offsets)
    return GroupedGemmFunction.apply(a, b, group_offsets)


def grouped_gemm_reference(a: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, one matmul per group in the inputs' dtype (pass float64 for a
    reference); differentiable. Reads the offsets on the host."""
    offsets = group_offsets.tolist()
    pieces = [a[offsets[g]:offsets[g + 1]] @ b[g].T for g in range(b.shape[0])]
    if not pieces:
        return a.new_zeros(a.shape[0], b.shape[1])
    return torch.cat(pieces, dim=0)
