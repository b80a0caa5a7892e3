"""MoE routing ops: top-k softmax, alignment of (token, slot) pairs by expert, permutation.

The kernels are the C++/CUDA ops ``torch.ops.livethinking.*`` of ``livethinking._C``;
this module validates arguments with errors that name them, registers the fake
(meta) kernels that ``torch.compile`` needs and the autograd formulas.

A *pair* ``p = t * top_k + j`` is slot j of token t. An alignment lists the pairs
grouped by expert (stable within an expert), each expert's segment padded to a
multiple of ``block_size``; its buffers have sizes known from (T, k, E, block_size)
alone, so nothing waits on the device::

    max_rows = floor((T*k + min(E, T*k) * (block_size - 1)) / block_size) * block_size
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from livethinking import _extension

__all__ = ["MoeAlignment", "moe_topk_softmax", "moe_align", "moe_permute", "moe_unpermute"]

MAX_CUDA_EXPERTS = 1024
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class MoeAlignment(NamedTuple):
    """The pairs of ``topk_ids`` grouped by expert; every index tensor is int32.

    ``sentinel = T * top_k`` marks padding rows in ``sorted_ids``.
    """

    sorted_ids: torch.Tensor  # (max_rows,) pair of each routed row, sentinel on padding
    expert_offsets: torch.Tensor  # (E + 1,) first row of each expert's padded segment
    block_experts: torch.Tensor  # (max_rows // block_size,) expert of each block, -1 past the end
    num_rows_padded: torch.Tensor  # (1,) rows in use: expert_offsets[E]
    row_of_pair: torch.Tensor  # (T, top_k) routed row of each pair
    tokens_per_expert: torch.Tensor  # (E,) pairs routed to each expert, unpadded
    block_size: int

    @property
    def top_k(self) -> int:
        return self.row_of_pair.shape[1]

    @property
    def sentinel(self) -> int:
        return self.row_of_pair.numel()


# --------------------------------------------------------------------------- checks


def _check_tensor(value, name: str, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(value.shape)}")
    return value


def _check_int(value, name: str, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}{hint}, got {value}")
    return value


def _check_device(tensor: torch.Tensor, name: str, reference: torch.Tensor, ref_name: str) -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {reference.device}; "
                         "all tensors must be on one device")


def _check_data(value, name: str, shape_doc: str) -> torch.Tensor:
    _check_tensor(value, name, 2, shape_doc)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    return value


def _check_alignment(alignment, data: torch.Tensor, name: str) -> MoeAlignment:
    if not isinstance(alignment, MoeAlignment):
        raise TypeError(f"alignment must be the MoeAlignment that moe_align returned, "
                        f"got {type(alignment).__name__}")
    _check_device(alignment.sorted_ids, "alignment.sorted_ids", data, name)
    return alignment


def _routing_weights(topk_weights, data: torch.Tensor, name: str,
                     alignment: MoeAlignment) -> torch.Tensor | None:
    """Weights as the kernels take them: float32 (float64 for float64 data), shape (T, k)."""
    if topk_weights is None:
        return None
    _check_tensor(topk_weights, "topk_weights", 2, "(tokens, top_k)")
    expected = tuple(alignment.row_of_pair.shape)
    if tuple(topk_weights.shape) != expected:
        raise ValueError(f"topk_weights must have shape {expected} (tokens, top_k) like the "
                         f"alignment, got {tuple(topk_weights.shape)}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    _check_device(topk_weights, "topk_weights", data, name)
    return topk_weights.to(torch.float64 if data.dtype == torch.float64 else torch.float32)


# --------------------------------------------------------------------------- public ops


def moe_topk_softmax(router_logits: torch.Tensor, top_k: int,
                     renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Router top-k: p = softmax(float32(router_logits)) over experts, then the k largest.

    router_logits: (T, E) float32/bfloat16/float16. Experts are ranked by logit, ties
    going to the lower expert id. Returns ``topk_weights`` (T, k) float32 = p at the
    chosen experts (divided by their sum when ``renormalize``, Qwen3's
    ``norm_topk_prob``) and ``topk_ids`` (T, k) int32, in descending order.
    Differentiable in router_logits through topk_weights.
    """
    _check_tensor(router_logits, "router_logits", 2, "(tokens, num_experts)")
    if router_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"router_logits must be float32, bfloat16 or float16, "
                        f"got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    _check_int(top_k, "top_k", 1, num_experts, hint=f" (num_experts = {num_experts})")
    if router_logits.is_cuda and num_experts > MAX_CUDA_EXPERTS:
        raise ValueError(f"router_logits has {num_experts} experts; the CUDA kernel takes at most "
                         f"{MAX_CUDA_EXPERTS}")
    _extension.require_compiled(router_logits.device)
    return torch.ops.livethinking.moe_topk_softmax(router_logits, top_k, bool(renormalize))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_size: int = 1) -> MoeAlignment:
    """Group the T·k (token, slot) pairs of ``topk_ids`` (T, k) by expert.

    Stable within an expert (ascending pair index); each expert's segment padded to a
    multiple of ``block_size`` (1 = no padding) with the sentinel T·k. Device-side only:
    no host synchronisation, so it can be captured in a CUDA graph. Ids must lie in
    [0, num_experts): the CPU kernel raises otherwise, the CUDA kernel traps.
    """
    _check_tensor(topk_ids, "topk_ids", 2, "(tokens, top_k)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _check_int(num_experts, "num_experts", 1)
    top_k = topk_ids.shape[1]
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k = topk_ids.shape[1] must be in [1, num_experts={num_experts}], "
                         f"got {top_k}")
    _check_int(block_size, "block_size", 1, 2**31 - 1)
    if topk_ids.is_cuda and num_experts > MAX_CUDA_EXPERTS:
        raise ValueError(f"num_experts must be <= {MAX_CUDA_EXPERTS} on CUDA, got {num_experts}")
    _extension.require_compiled(topk_ids.device)
    outputs = torch.ops.livethinking.moe_align(topk_ids.to(torch.int32), num_experts, block_size)
    return MoeAlignment(*outputs, block_size=block_size)


def moe_permute(x: torch.Tensor, alignment: MoeAlignment,
                topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gather tokens into expert order: rows[r] = w[p] · x[p // k] for p = sorted_ids[r].

    x: (T, H) → rows (max_rows, H) in x's dtype; padding rows are 0; w = 1 when
    ``topk_weights`` (T, k) is None. Differentiable in x and topk_weights: the gradient
    of x is ``moe_unpermute`` of the row gradients.
    """
    _check_data(x, "x", "(tokens, hidden)")
    _check_alignment(alignment, x, "x")
    if x.shape[0] != alignment.row_of_pair.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but the alignment was made for "
                         f"{alignment.row_of_pair.shape[0]}")
    weights = _routing_weights(topk_weights, x, "x", alignment)
    _extension.require_compiled(x.device)
    return torch.ops.livethinking.moe_permute(x, alignment.sorted_ids, alignment.row_of_pair,
                                              weights)


def moe_unpermute(y: torch.Tensor, alignment: MoeAlignment,
                  topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine expert rows back per token: out[t] = Σ_j w[t, j] · y[row_of_pair[t, j]].

    y: (max_rows, H) → out (T, H) in y's dtype, summed over j in ascending order in
    float32 (float64 for float64 y): deterministic, no atomics. Differentiable in y and
    topk_weights.
    """
    _check_data(y, "y", "(rows, hidden)")
    _check_alignment(alignment, y, "y")
    if y.shape[0] != alignment.sorted_ids.shape[0]:
        raise ValueError(f"y must have one row per routed row of the alignment "
                         f"({alignment.sorted_ids.shape[0]}), got {y.shape[0]}")
    weights = _routing_weights(topk_weights, y, "y", alignment)
    _extension.require_compiled(y.device)
    return torch.ops.livethinking.moe_unpermute(y, alignment.sorted_ids, alignment.row_of_pair,
                                                weights)
