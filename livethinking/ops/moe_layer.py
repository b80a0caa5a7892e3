"""The fused MoE expert layer, dispatched per device.

CUDA: the Triton kernels of ``livethinking.kernels.fused_moe`` (gather in the first
GEMM, SiLU·mul epilogue, deterministic combine), routed by the C++ ``moe_align``.
CPU: the C++ routing ops around the expert GEMMs: asked for (``grouped``, the engine's
steps) and without autograd, one grouped GEMM per projection over all experts' rows (in
float32 the C++ skinny GEMM of ``ops.linear``: 1.2-3.4× ``torch._grouped_mm`` at 32 down to
1 rows for each of 8 experts of 1024×512, measured once; other dtypes
``torch._grouped_mm``, 1.4–1.7× the per-expert loop); otherwise one matmul pair per expert that receives tokens (on the CPU reading the per-expert counts
costs nothing), differentiable end to end (the grouped GEMM has no CPU backward).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from livethinking.kernels import fused_moe as triton_moe
from livethinking.ops.linear import grouped_linear
from livethinking.ops.routing import moe_align, moe_permute, moe_unpermute

__all__ = ["fused_moe"]


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              grouped: bool = False) -> torch.Tensor:
    """out[t] = Σ_j w[t, j] · W_down[e] (silu(W_gate[e] x[t]) ⊙ W_up[e] x[t]), e = topk_ids[t, j].

    x (T, H); w_gate_up (E, 2I, H) with the gate rows first and w_down (E, H, I), as
    transformers' Qwen3-MoE stores them; topk_weights, topk_ids (T, k). fp32
    accumulation; output in x's dtype. Differentiable in x, both weights and
    topk_weights (so the router trains). ``grouped`` (the engine's steps): on the CPU
    without autograd, grouped GEMMs over all experts (faster at decode; not always bit
    for bit the per-expert loop the trainer runs).
    """
    triton_moe.check_fused_moe_inputs(x, w_gate_up, w_down, topk_weights, topk_ids)
    num_experts = w_gate_up.shape[0]
    alignment = moe_align(topk_ids, num_experts, 1)
    if x.is_cuda:
        routing = (alignment.sorted_ids, alignment.expert_offsets, alignment.row_of_pair)
        return triton_moe.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, routing=routing)
    return _fused_moe_cpu(x, w_gate_up, w_down, topk_weights, alignment, grouped)


def _fused_moe_cpu(x, w_gate_up, w_down, topk_weights, alignment, grouped):
    rows = moe_permute(x, alignment)  # (T·k, H), grouped by expert
    wants_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, w_gate_up, w_down, topk_weights))
    if grouped and not wants_grad:
        y = _grouped_experts(rows, w_gate_up, w_down, alignment)
        if y is not None:
            return moe_unpermute(y, alignment, topk_weights)
    counts = alignment.tokens_per_expert.tolist()
    # unbind once: its backward stacks the experts' gradients into one tensor, where
    # indexing w[e] per expert would add a full-size zero gradient per expert
    gate_up_experts, down_experts = w_gate_up.unbind(0), w_down.unbind(0)
    outputs = []
    for expert, expert_rows in enumerate(torch.split(rows, counts)):
        if expert_rows.shape[0] == 0:
            continue
        gate, up = F.linear(expert_rows, gate_up_experts[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, down_experts[expert]))  # (rows_e, H)
    y = torch.cat(outputs) if outputs else rows.new_zeros(0, w_down.shape[1])
    return moe_unpermute(y, alignment, topk_weights)


def _grouped_experts(rows, w_gate_up, w_down, alignment):
    """The experts' SwiGLU on their rows (T·k, H) by two grouped GEMMs: in float32 the C++
    skinny GEMMs (an expert's few rows at decode; MKL past 64); else ``torch._grouped_mm``,
    or None where this torch has no CPU grouped GEMM for this dtype (probed once per
    dtype) or the sizes break its rule that strides be multiples of 16 bytes."""
    ends = torch.cumsum(alignment.tokens_per_expert, 0)  # (E,) end of each group
    gate_up = grouped_linear(rows, w_gate_up, ends)
    if gate_up is not None:
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, w_down, ends)
    if not hasattr(torch, "_grouped_mm"):
        return None
    aligned = all(n * rows.element_size() % 16 == 0 for n in w_gate_up.shape[1:])
    if not (aligned and _has_cpu_grouped_mm(rows.dtype)):
        return None
    ends = ends.to(torch.int32)
    gate, up = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=ends)


@functools.lru_cache(maxsize=None)
def _has_cpu_grouped_mm(dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs on CPU tensors of ``dtype`` in this torch (older
    builds have it for CUDA only)."""
    a, b = torch.ones(2, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype)
    try:
        torch._grouped_mm(a, b, offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True
