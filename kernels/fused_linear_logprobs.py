"""Token log-probabilities and entropies of an LM head without the (N, V) logits.

Math. For hidden states ``x`` (N, H), the head ``W`` (V, H), an optional bias ``b`` (V,),
a temperature ``T > 0`` and targets ``y`` (N,):

    z[n, v]    = (x[n] · W[v] + b[v]) / T                  (fp32 accumulation)
    lse[n]     = log Σ_v exp z[n, v]
    logp[n]    = z[n, y[n]] − lse[n]
    entropy[n] = −Σ_v p log p = lse[n] − Σ_v p[n, v] z[n, v],   p = softmax(z[n])

Forward. One program per block of BLOCK_M rows walks the vocabulary in BLOCK_V tiles;
each tile of z is a ``tl.dot`` over H in BLOCK_H chunks and is consumed at once by an
online softmax that keeps, per row, the running max m, s = Σ exp(z − m) and
t = Σ exp(z − m)·(z − m) (both rescaled when m grows: s ← α s, t ← α (t + s (m − m')),
α = exp(m − m')), plus the target's logit. At the end logp = (z_y − m) − log s and
entropy = log s − t / s: both entropy terms are ≥ 0, so it has no cancellation against
the size of the logits (t is kept relative to m for that reason). lse is kept as the
pair (m, log s), never rounded to one number: the backward's log p = (z − m) − log s is
then as accurate as PyTorch's log_softmax (z − lse would add an error of u·|lse| to
every log p of a row, all of one sign). When the row blocks are too few to fill the
GPU (fewer than its SMs), the vocabulary is split over a second grid axis and the
per-split (m, s, t, z_target) are merged in plain PyTorch (O(N · splits) work).

Backward. With upstream gradients g (of logp) and e (of entropy), p = softmax(z) and
log p_v = z_v − lse:

    ∂logp/∂z_v    = 1[v = y] − p_v
    ∂entropy/∂z_v = −p_v (log p_v + entropy)
    dZ[n, v]      = (g[n] (1[v = y[n]] − p_v) − e[n] p_v (log p_v + entropy[n])) / T

    d x = dZ · W,   d W = dZᵀ · x,   d b = Σ_n dZ[n, :]

Rows are processed in chunks of C rows: a Triton kernel recomputes the chunk's logits
tile by tile from (x, W, b, m, log s, entropy, y, g, e) and writes dZ for the chunk (C, V)
in the input dtype (fp32 for fp32 inputs); then ``torch.matmul`` gives d x for the
chunk, a second Triton kernel adds dZᵀ x into an fp32 (V, H) buffer (one program per
buffer tile reads it, runs the chunk's rows through ``tl.dot`` on the tensor cores with
fp32 accumulation and writes it back), and ``sum`` gives d b. The buffer is cast to W's
dtype at the end. Upcasting dZ and x for an fp32 ``addmm_`` would cost C·(V + H)·4
bytes more per chunk and run the largest GEMM on fp32 CUDA cores (about 10× slower
than bf16 tensor cores). Everything runs in a fixed order: deterministic, no atomics.

Row mask. Rows whose ``row_mask`` is False get logp = entropy = 0 and zero gradients;
their targets are never used (any value, e.g. −100, is fine). A row block whose rows
are all masked skips its GEMM work (device-side loop bounds, no host sync) in the
forward, the dZ kernel and the d W kernel, which also never reads masked rows of dZ
and x. Only the d x product (``torch.matmul``, cuBLAS) still runs over the zero dZ rows:
skipping them there would need a host sync to compact the unmasked rows, or a
hand-written GEMM in place of cuBLAS.

Memory (elem = bytes of the input dtype, acc = 4, or 8 for float64 inputs):
* naive (logits materialised, as ``fused_linear_logprobs_reference``): the (N, V)
  logits, their fp32 copy and log-softmax kept for backward, then an (N, V) gradient:
  about N·V·(elem + 2·acc) saved plus N·V·acc transient. For N = 16384, V = 151936
  that is 25 GB for bf16.
* here, forward: outputs logp, entropy, m and log s, 4·N·acc (plus 4·N·splits·acc for
  split partials); nothing of size N·V or V·H. The forward-only path (no input
  requires grad, or grad mode off) saves nothing for backward.
* here, backward: grad x (N·H·elem), the fp32 d W buffer (V·H·acc) and its cast
  (V·H·elem, while the buffer is alive), d b (V·acc), and one dZ chunk (C·V·elem,
  reused by every chunk). C is the largest multiple of the row tile with
  C·V·elem <= BACKWARD_CHUNK_BYTES (256 MiB; C = 832 for V = 151936 in bf16), or
  ``chunk_size``.

Compute: forward 2·N·V·H FLOPs; backward 6·N·V·H (recompute, d x, d W). The d W
accumulation also reads and writes the fp32 buffer once per chunk: 8·V·H bytes against
2·C·V·H FLOPs, C/4 FLOP per byte, where an H100's bf16 tensor cores need about 270. At
the default C (832 for a 152k vocabulary) that traffic costs about as much time as the
d W GEMM itself (an estimate, not measured): raise BACKWARD_CHUNK_BYTES or pass
``chunk_size`` where memory allows.

Precision. fp32 inputs are multiplied with ``input_precision="ieee"`` in all three
kernels (no TF32: fp32 log-probs must be accurate; only the d x ``torch.matmul``
follows torch's own TF32 setting); bf16/fp16 run on the tensor cores with fp32
accumulation. float64 inputs are accepted under the Triton interpreter only (CPU
tensors, for gradcheck; computed and returned in float64): Triton's fp64 ``tl.dot``
does not compile for NVIDIA GPUs (triton 3.8 fails an assertion, "fp64 don't support
largeK MMA", which aborts the process), so CUDA float64 inputs are refused with an
error. Under the interpreter (``TRITON_INTERPRET=1``) bf16 ``tl.dot`` is computed
wrongly by the interpreter itself: use fp32/fp16/fp64 there.

Targets must lie in [0, V) for unmasked rows; this is a device-side property that is
not checked here (it would need a host sync): an out-of-range target gives an
undefined logp, never an out-of-bounds access. The ops layer checks it.

This file stands alone (torch and triton only): kernels, launchers, the autograd
function, the public function and the plain-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "BACKWARD_CHUNK_BYTES",
    "CONFIGS",
    "INTERPRETER_CONFIG",
    "LogprobsConfig",
    "TileConfig",
    "fused_linear_logprobs",
    "fused_linear_logprobs_backward",
    "fused_linear_logprobs_forward",
    "fused_linear_logprobs_reference",
    "select_config",
]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_block(pid_m, num_rows, mask_ptr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of block ``pid_m``: (rows int64, in range, in range and unmasked, any unmasked)."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_rows
    if HAS_MASK:
        row_on = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        row_on = row_ok
    return rows, row_ok, row_on, tl.max(row_on.to(tl.int32), axis=0) > 0


@triton.jit
def _fused_linear_logprobs_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mask_ptr,
    logp_ptr, ent_ptr, max_ptr, logs_ptr,
    part_m_ptr, part_s_ptr, part_t_ptr, part_zt_ptr,
    N, V, H, inv_temp, v_per_split, num_splits,
    stride_xn, stride_xh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # x: (N, H)   w: (V, H)   b: (V,)   y: (N,) int   mask: (N,) uint8 (bool viewed)
    # FINAL (one split): logp, ent, max (m), logs (log s): (N,)
    # else part_m, part_s, part_t, part_zt: (N, num_splits), column = this split
    # grid: (cdiv(N, BLOCK_M), num_splits); split j owns columns [j·v_per_split, (j+1)·v_per_split)
    # The accumulator dtype is the output's: fp32, or fp64 for fp64 inputs.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_ty = logp_ptr.dtype.element_ty
    rows, row_ok, row_on, any_on = _row_block(pid_m, N, mask_ptr, HAS_MASK, BLOCK_M)
    tgt = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)

    v_begin = pid_s * v_per_split
    v_stop = tl.minimum(v_begin + v_per_split, V)
    v_end = tl.where(any_on, v_stop, v_begin)  # an all-masked block does no GEMM work
    hs = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows[:, None] * stride_xn                                   # (BLOCK_M, 1)

    m = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    s = tl.zeros((BLOCK_M,), acc_ty)
    t = tl.zeros((BLOCK_M,), acc_ty)
    zt = tl.zeros((BLOCK_M,), acc_ty)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv                  # (1, BLOCK_V)
        acc = tl.zeros((BLOCK_M, BLOCK_V), acc_ty)
        for h0 in range(0, H, BLOCK_H):
            h_ok = (h0 + hs) < H
            x = tl.load(x_rows + (h0 + hs)[None, :] * stride_xh,
                        mask=row_on[:, None] & h_ok[None, :], other=0.0)          # (BLOCK_M, BLOCK_H)
            w = tl.load(w_cols + (h0 + hs)[:, None] * stride_wh,
                        mask=h_ok[:, None] & col_ok[None, :], other=0.0)          # (BLOCK_H, BLOCK_V)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        pz = tl.exp(z - m_new[:, None])                                          # 0 off the vocabulary
        z_shifted = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        shift = s * tl.where(s > 0, m - m_new, 0.0)                              # s = 0 while m = -inf
        t = alpha * (t + shift) + tl.sum(pz * z_shifted, axis=1)
        s = alpha * s + tl.sum(pz, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    if FINAL:
        # s >= 1 on every unmasked row (its max term is exp(0)); masked rows get 0
        s = tl.where(row_on, s, 1.0)
        m = tl.where(row_on, m, 0.0)
        log_s = tl.log(s)
        tl.store(logp_ptr + rows, tl.where(row_on, (zt - m) - log_s, 0.0), mask=row_ok)
        tl.store(ent_ptr + rows, tl.where(row_on, log_s - t / s, 0.0), mask=row_ok)
        tl.store(max_ptr + rows, m, mask=row_ok)
        tl.store(logs_ptr + rows, tl.where(row_on, log_s, 0.0), mask=row_ok)
    else:
        part = rows * num_splits + pid_s
        tl.store(part_m_ptr + part, m, mask=row_ok)
        tl.store(part_s_ptr + part, s, mask=row_ok)
        tl.store(part_t_ptr + part, t, mask=row_ok)
        tl.store(part_zt_ptr + part, zt, mask=row_ok)


@triton.jit
def _fused_linear_logprobs_dz_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mask_ptr, max_ptr, logs_ptr, ent_ptr, g_ptr, e_ptr, dz_ptr,
    R, V, H, inv_temp,
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dzn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G: tl.constexpr, HAS_E: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One chunk of R rows (all pointers already offset to the chunk's first row):
    # x: (R, H)   w: (V, H)   b: (V,)   y, mask, max, logs, ent, g, e: (R,)   dz: (R, V)
    # grid: (cdiv(R, BLOCK_M), cdiv(V, BLOCK_V))
    # dz[n, v] = (g (1[v = y] − p) − e p (log p + ent)) / T, log p = (z − m) − log s with z
    # recomputed; 0 on masked rows.
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    acc_ty = max_ptr.dtype.element_ty
    rows, row_ok, row_on, any_on = _row_block(pid_m, R, mask_ptr, HAS_MASK, BLOCK_M)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < V
    hs = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows[:, None] * stride_xn                                   # (BLOCK_M, 1)
    w_cols = w_ptr + cols[None, :] * stride_wv                                   # (1, BLOCK_V)

    acc = tl.zeros((BLOCK_M, BLOCK_V), acc_ty)
    h_end = tl.where(any_on, H, 0)  # an all-masked block does no GEMM work and writes zeros
    for h0 in range(0, h_end, BLOCK_H):
        h_ok = (h0 + hs) < H
        x = tl.load(x_rows + (h0 + hs)[None, :] * stride_xh,
                    mask=row_on[:, None] & h_ok[None, :], other=0.0)              # (BLOCK_M, BLOCK_H)
        w = tl.load(w_cols + (h0 + hs)[:, None] * stride_wh,
                    mask=h_ok[:, None] & col_ok[None, :], other=0.0)              # (BLOCK_H, BLOCK_V)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
    m = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(logs_ptr + rows, mask=row_ok, other=0.0)
    log_p = (acc * inv_temp - m[:, None]) - log_s[:, None]                       # (BLOCK_M, BLOCK_V)
    p = tl.exp(log_p)
    dz = tl.zeros((BLOCK_M, BLOCK_V), acc_ty)
    if HAS_G:
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
        tgt = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        hit = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz += g[:, None] * (hit - p)
    if HAS_E:
        e = tl.load(e_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        dz -= e[:, None] * p * (log_p + ent[:, None])
    dz = tl.where(row_on[:, None], dz * inv_temp, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_accumulate_kernel(
    dz_ptr, x_ptr, dw_ptr, mask_ptr, block_ids_ptr, num_blocks_ptr,
    R, V, H,
    stride_dzn, stride_xn, stride_xh, stride_dwv,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # dz: (R, V)   x: (R, H)   mask: (R,)   dw: (V, H) fp32 (fp64 for fp64 inputs), in place
    # block_ids: (cdiv(R, BLOCK_M),) the row blocks holding an unmasked row first, ascending;
    # num_blocks: (1,) how many do (both only read with HAS_MASK)
    # grid: (cdiv(V, BLOCK_V), cdiv(H, BLOCK_H))
    # dw[tile] += dz[:, tile rows]ᵀ @ x[:, tile cols], the row blocks walked in order by the
    # one program that owns the tile: deterministic, no atomics. With a mask the loop runs
    # over the active blocks only (its trip count read on the device: no host sync, and no
    # branch in the loop body to stop Triton pipelining its loads) and masked rows are not
    # read (their dz is 0).
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    v_ok = cols_v < V
    h_ok = cols_h < H
    dw_ptrs = dw_ptr + cols_v[:, None] * stride_dwv + cols_h[None, :]           # (BLOCK_V, BLOCK_H)
    tile_ok = v_ok[:, None] & h_ok[None, :]
    acc = tl.load(dw_ptrs, mask=tile_ok, other=0.0)
    if HAS_MASK:
        num_steps = tl.load(num_blocks_ptr)
    else:
        num_steps = tl.cdiv(R, BLOCK_M)
    for step in range(0, num_steps):
        if HAS_MASK:
            block = tl.load(block_ids_ptr + step)
        else:
            block = step
        rows, _, r_on, _ = _row_block(block, R, mask_ptr, HAS_MASK, BLOCK_M)
        dz = tl.load(dz_ptr + rows[:, None] * stride_dzn + cols_v[None, :],
                     mask=r_on[:, None] & v_ok[None, :], other=0.0)                # (BLOCK_M, BLOCK_V)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols_h[None, :] * stride_xh,
                    mask=r_on[:, None] & h_ok[None, :], other=0.0)                 # (BLOCK_M, BLOCK_H)
        acc = tl.dot(tl.trans(dz), x, acc, input_precision=PRECISION)
    tl.store(dw_ptrs, acc, mask=tile_ok)


# ----------------------------------------------------------------------------- configs


class TileConfig(NamedTuple):
    block_m: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


class LogprobsConfig(NamedTuple):
    logits: TileConfig       # forward and dZ: a BLOCK_M x BLOCK_V logits tile, loop over H
    weight_grad: TileConfig  # d W: a BLOCK_V x BLOCK_H tile, loop over the chunk's rows by BLOCK_M


# Per (device name, dtype class); "default" applies to any device not listed. Starting
# points, not tuned on hardware. fp32 tiles are smaller: twice the bytes per element in
# shared memory, and no tensor cores (IEEE fp32). No fp64 entry: fp64 never runs on CUDA.
CONFIGS: dict[tuple[str, str], LogprobsConfig] = {
    ("default", "half"): LogprobsConfig(TileConfig(64, 128, 64, 8, 3), TileConfig(64, 128, 128, 8, 3)),
    ("default", "fp32"): LogprobsConfig(TileConfig(64, 64, 32, 4, 3), TileConfig(32, 64, 64, 4, 3)),
}
# Under the Triton interpreter: few programs and loop iterations, large blocks.
INTERPRETER_CONFIG = LogprobsConfig(TileConfig(16, 512, 32, 1, 1), TileConfig(16, 512, 32, 1, 1))

# Bytes of the backward's dZ chunk (C rows x V).
BACKWARD_CHUNK_BYTES = 256 * 2**20

# Decided at import, as triton.jit decides whether to interpret.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def select_config(device: torch.device | str, dtype: torch.dtype) -> LogprobsConfig:
    """Tile sizes for inputs of ``dtype`` on ``device`` (a table, no autotuning)."""
    device = torch.device(device)
    if device.type != "cuda" or _INTERPRET or os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_CONFIG
    kind = "fp32" if dtype == torch.float32 else "half"
    name = torch.cuda.get_device_name(device)
    return CONFIGS.get((name, kind), CONFIGS[("default", kind)])


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _precision(t: torch.Tensor) -> str | None:
    """fp32/fp64 dots in full precision (Triton's fp32 default would be tf32)."""
    return "ieee" if t.dtype in (torch.float32, torch.float64) else None


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _no_stride0(t: torch.Tensor) -> torch.Tensor:
    """Copy expanded (stride-0) tensors; leave other layouts to the kernels' strides."""
    return t.contiguous() if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)) else t


def _device_guard(t: torch.Tensor):
    """Launch on t's GPU (not merely the current one); nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------- launchers


def _num_splits(num_row_blocks: int, num_v_tiles: int, t: torch.Tensor) -> int:
    """Vocabulary splits so that about two programs per SM run (1 when rows suffice)."""
    if not t.is_cuda or _INTERPRET:
        return 1
    sms = _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if num_row_blocks >= sms:
        return 1
    return max(1, min(num_v_tiles, triton.cdiv(2 * sms, num_row_blocks), 64))


def fused_linear_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  bias: torch.Tensor | None = None, temperature: float = 1.0,
                                  row_mask: torch.Tensor | None = None, *,
                                  config: LogprobsConfig | None = None,
                                  num_splits: int | None = None):
    """(logp, entropy, m, log s), each (N,) fp32 (fp64 for fp64 inputs), with
    lse = m + log s (m: the row's largest logit); masked rows give 0 in all four.

    No autograd and no argument checks (``fused_linear_logprobs`` checks). ``num_splits``
    overrides how many parts the vocabulary is split into (default: from the SM count).
    """
    hidden, weight = _no_stride0(hidden), _no_stride0(weight)
    targets = targets.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(hidden)
    if n == 0:
        return tuple(torch.empty(0, dtype=acc, device=hidden.device) for _ in range(4))
    cfg = (config or select_config(hidden.device, hidden.dtype)).logits
    row_blocks = triton.cdiv(n, cfg.block_m)
    v_tiles = triton.cdiv(v, cfg.block_v)
    splits = num_splits or _num_splits(row_blocks, v_tiles, hidden)
    splits = max(1, min(splits, v_tiles))
    v_per_split = triton.cdiv(v_tiles, splits) * cfg.block_v
    splits = triton.cdiv(v, v_per_split)  # no split is left empty
    mask = row_mask.contiguous().view(torch.uint8) if row_mask is not None else None
    if splits == 1:  # the kernel writes the results; the partials are not used
        outs = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(4)]
        parts = outs
    else:  # the kernel writes per-split partials, merged below
        parts = [torch.empty(n, splits, dtype=acc, device=hidden.device) for _ in range(4)]
        outs = parts
    with _device_guard(hidden):
        _fused_linear_logprobs_forward_kernel[(row_blocks, splits)](
            hidden, weight, bias if bias is not None else weight, targets,
            mask if mask is not None else targets,
            *outs, *parts,
            n, v, h, 1.0 / temperature, v_per_split, splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, FINAL=splits == 1,
            PRECISION=_precision(hidden),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if splits == 1:
        return tuple(outs)
    part_m, part_s, part_t, part_zt = parts
    m = part_m.amax(dim=1, keepdim=True)
    alpha = torch.exp(part_m - m)                 # masked rows: NaN, replaced below
    s = (alpha * part_s).sum(dim=1)
    shift = torch.where(part_s > 0, part_s * (part_m - m), 0.0)
    t = (alpha * (part_t + shift)).sum(dim=1)
    m = m.squeeze(1)
    log_s = torch.log(s)
    logp = (part_zt.sum(dim=1) - m) - log_s
    ent = log_s - t / s
    row_max, log_sum = m, log_s
    if row_mask is not None:  # masked rows: NaN from the empty partials, set to 0
        logp, ent, row_max, log_sum = (torch.where(row_mask, r, 0.0)
                                       for r in (logp, ent, row_max, log_sum))
    return logp, ent, row_max, log_sum


def _active_row_blocks(mask: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids (cdiv(R, block_m),) int32, count (1,) int32): the row blocks of ``mask``
    (R,) holding an unmasked row, ascending, then the others; computed on the device."""
    num_blocks = triton.cdiv(mask.shape[0], block_m)
    padded = torch.nn.functional.pad(mask != 0, (0, num_blocks * block_m - mask.shape[0]))
    active = padded.view(num_blocks, block_m).any(dim=1)                       # (num_blocks,)
    order = torch.argsort((~active).to(torch.int32), stable=True)
    return order.to(torch.int32), active.sum(dtype=torch.int32).reshape(1)


def _chunk_rows(n: int, v: int, dz_dtype: torch.dtype, block_m: int, chunk_size: int | None) -> int:
    """Rows per backward chunk: ``chunk_size``, or as many whole row tiles as fit
    BACKWARD_CHUNK_BYTES of dZ (at least one row)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    rows = max(1, BACKWARD_CHUNK_BYTES // (v * dz_dtype.itemsize))
    if rows >= block_m:
        rows -= rows % block_m  # whole row tiles
    return min(rows, n)


def fused_linear_logprobs_backward(grad_logp, grad_entropy, hidden, weight, targets, bias, row_mask,
                                   row_max, log_sum, entropy, temperature, *,
                                   needs=(True, True, True),
                                   chunk_size: int | None = None,
                                   config: LogprobsConfig | None = None):
    """(d hidden, d weight, d bias) for upstream gradients of logp and entropy (either
    may be None). ``needs`` says which of the three to compute (None for the others)."""
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(hidden)
    grad_x = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_x else None
    grad_w = torch.zeros(v, h, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
    if n > 0 and (grad_logp is not None or grad_entropy is not None) and (need_x or need_w or need_b):
        hidden, weight = _no_stride0(hidden), _no_stride0(weight)
        targets = targets.contiguous()
        g = grad_logp.to(acc).contiguous() if grad_logp is not None else None
        e = grad_entropy.to(acc).contiguous() if grad_entropy is not None else None
        mask = row_mask.contiguous().view(torch.uint8) if row_mask is not None else None
        config = config or select_config(hidden.device, hidden.dtype)
        cfg, wcfg = config.logits, config.weight_grad
        rows_per_chunk = _chunk_rows(n, v, hidden.dtype, cfg.block_m, chunk_size)
        dz_buf = torch.empty(rows_per_chunk, v, dtype=hidden.dtype, device=hidden.device)
        v_tiles = triton.cdiv(v, cfg.block_v)
        wgrid = (triton.cdiv(v, wcfg.block_v), triton.cdiv(h, wcfg.block_h))
        dummy = row_max
        with _device_guard(hidden):
            for r0 in range(0, n, rows_per_chunk):
                r1 = min(n, r0 + rows_per_chunk)
                dz = dz_buf[:r1 - r0]
                x = hidden[r0:r1]
                _fused_linear_logprobs_dz_kernel[(triton.cdiv(r1 - r0, cfg.block_m), v_tiles)](
                    x, weight, bias if bias is not None else dummy, targets[r0:r1],
                    mask[r0:r1] if mask is not None else dummy,
                    row_max[r0:r1], log_sum[r0:r1], entropy[r0:r1],
                    g[r0:r1] if g is not None else dummy, e[r0:r1] if e is not None else dummy, dz,
                    r1 - r0, v, h, 1.0 / temperature,
                    x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
                    HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                    HAS_G=g is not None, HAS_E=e is not None, PRECISION=_precision(hidden),
                    BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
                if need_x:
                    torch.matmul(dz, weight, out=grad_x[r0:r1])
                if need_w:
                    if mask is not None:
                        block_ids, num_blocks = _active_row_blocks(mask[r0:r1], wcfg.block_m)
                    else:
                        block_ids = num_blocks = dummy
                    _weight_grad_accumulate_kernel[wgrid](
                        dz, x, grad_w, mask[r0:r1] if mask is not None else dummy,
                        block_ids, num_blocks, r1 - r0, v, h,
                        dz.stride(0), x.stride(0), x.stride(1), grad_w.stride(0),
                        HAS_MASK=mask is not None, PRECISION=_precision(hidden),
                        BLOCK_M=wcfg.block_m, BLOCK_V=wcfg.block_v, BLOCK_H=wcfg.block_h,
                        num_warps=wcfg.num_warps, num_stages=wcfg.num_stages,
                    )
                if need_b:
                    grad_b += dz.sum(dim=0, dtype=acc)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_x, grad_w, grad_b


# ----------------------------------------------------------------------------- autograd


class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_mask, temperature, chunk_size):
        logp, ent, row_max, log_sum = fused_linear_logprobs_forward(hidden, weight, targets, bias,
                                                                    temperature, row_mask)
        ctx.save_for_backward(hidden, weight, bias, targets, row_mask, row_max, log_sum, ent)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, row_mask, row_max, log_sum, ent = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = fused_linear_logprobs_backward(
            grad_logp, grad_entropy, hidden, weight, targets, bias, row_mask, row_max, log_sum, ent,
            ctx.temperature, needs=needs, chunk_size=ctx.chunk_size)
        return grad_x, grad_w, grad_b, None, None, None, None


# ----------------------------------------------------------------------------- public API


def _expect_tensor(t, name: str, doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {doc}, got {type(t).__name__}")


def _validate(hidden, weight, targets, bias, temperature, row_mask, chunk_size) -> None:
    _expect_tensor(hidden, "hidden", "(N, H)")
    _expect_tensor(weight, "weight", "(V, H)")
    _expect_tensor(targets, "targets", "(N,)")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H); got shape {tuple(hidden.shape)}")
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be 2-D (V, H) with H = {h} (hidden's last dimension); "
                         f"got shape {tuple(weight.shape)}")
    v = weight.shape[0]
    if v == 0:
        raise ValueError("weight must have at least one row (V >= 1); got V = 0")
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64; got {hidden.dtype}")
    if hidden.dtype == torch.float64 and hidden.is_cuda:
        raise TypeError("hidden must be float32, bfloat16 or float16 on CUDA; got float64 "
                        "(Triton's fp64 tl.dot does not compile for NVIDIA GPUs; float64 runs "
                        "only under the Triton interpreter on CPU tensors)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}; got {weight.dtype}")
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must have shape (N,) = ({n},); got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64; got {targets.dtype}")
    if bias is not None:
        _expect_tensor(bias, "bias", "(V,)")
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape (V,) = ({v},); got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}; got {bias.dtype}")
    if row_mask is not None:
        _expect_tensor(row_mask, "row_mask", "(N,) bool")
        if tuple(row_mask.shape) != (n,):
            raise ValueError(f"row_mask must have shape (N,) = ({n},); got {tuple(row_mask.shape)}")
        if row_mask.dtype != torch.bool:
            raise TypeError(f"row_mask must be a bool tensor; got {row_mask.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number (a Python float); got "
                        f"{type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    for t, name in ((weight, "weight"), (targets, "targets"), (bias, "bias"), (row_mask, "row_mask")):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not (hidden.is_cuda or (hidden.device.type == "cpu" and _INTERPRET)):
        raise ValueError(f"hidden is on {hidden.device}: the kernels need CUDA tensors, or CPU "
                         f"tensors with TRITON_INTERPRET=1 set before this module is imported")


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          return_entropy: bool = False, row_mask: torch.Tensor | None = None,
                          chunk_size: int | None = None):
    """log softmax((hidden · weightᵀ + bias) / temperature)[n, targets[n]] without the logits.

    hidden (N, H), weight (V, H) and bias (V,) share a dtype (float32, bfloat16,
    float16; float64 too); targets (N,) int32/int64 in [0, V) for unmasked rows (not
    checked); row_mask (N,) bool: False rows give 0 and no gradient. Returns logp (N,)
    float32 (float64 for float64 inputs), or (logp, entropy) with ``return_entropy``.
    Differentiable in hidden, weight and bias; when none of them requires grad, or grad
    mode is off, only the forward kernel runs and nothing is saved. ``chunk_size``:
    rows per backward chunk (default: BACKWARD_CHUNK_BYTES of dZ per chunk).
    """
    _validate(hidden, weight, targets, bias, temperature, row_mask, chunk_size)
    temperature = float(temperature)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        logp, ent = FusedLinearLogprobsFunction.apply(hidden, weight, bias, targets, row_mask,
                                                      temperature, chunk_size)
    else:
        logp, ent, _, _ = fused_linear_logprobs_forward(
            hidden.detach(), weight.detach(), targets,
            bias.detach() if bias is not None else None, temperature, row_mask)
    return (logp, ent) if return_entropy else logp


def fused_linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                                    return_entropy: bool = False,
                                    row_mask: torch.Tensor | None = None):
    """Plain PyTorch, materialising the (N, V) logits: the linear in the inputs' dtype,
    the softmax in float32 (float64 for float64 inputs). Differentiable; same outputs."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = torch.nn.functional.linear(hidden, weight, bias).to(acc) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    on = row_mask if row_mask is not None else torch.ones_like(targets, dtype=torch.bool)
    safe_targets = torch.where(on, targets.long(), 0)
    logp = log_probs.gather(1, safe_targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    logp = torch.where(on, logp, torch.zeros_like(logp))
    entropy = torch.where(on, entropy, torch.zeros_like(entropy))
    return (logp, entropy) if return_entropy else logp
