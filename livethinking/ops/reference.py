"""Plain-PyTorch references of the routing ops: the math, written the obvious way.

Each one computes the same function as its op in :mod:`livethinking.ops.routing`
by a different algorithm (sorts and gathers instead of counting sorts and
kernels), so tests and benchmarks can hold the ops to them.
"""

from __future__ import annotations

import torch

__all__ = [
    "moe_topk_softmax_reference",
    "moe_align_reference",
    "moe_permute_reference",
    "moe_unpermute_reference",
]


def moe_topk_softmax_reference(router_logits: torch.Tensor, top_k: int,
                               renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(float32(logits)); the top_k experts by logit (ties: lower id first).

    Returns (topk_weights (T, k) float32, topk_ids (T, k) int32), the weights being
    p at those experts, divided by their sum when ``renormalize``.
    """
    logits = router_logits.float()  # (tokens, experts)
    probs = torch.softmax(logits, dim=-1)
    topk_ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    topk_weights = probs.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def moe_align_reference(topk_ids: torch.Tensor, num_experts: int,
                        block_size: int) -> dict[str, torch.Tensor]:
    """Pairs p = t * k + j grouped by expert (stable), segments padded to block_size.

    Returns a dict with the fields of ``MoeAlignment``: sorted_ids (padding =
    T * k), expert_offsets, block_experts (-1 past the end), num_rows_padded,
    row_of_pair and tokens_per_expert.
    """
    device = topk_ids.device
    num_tokens, top_k = topk_ids.shape
    experts = topk_ids.reshape(-1).long()  # (pairs,)
    num_pairs = experts.numel()
    counts = torch.bincount(experts, minlength=num_experts)  # (experts,)
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, 0)

    order = torch.argsort(experts, stable=True)  # pairs in expert order
    sorted_experts = experts[order]
    first_unpadded = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first_unpadded[sorted_experts]
    rows = offsets[sorted_experts] + rank  # row of each pair in `order`

    used = min(num_experts, num_pairs)
    max_blocks = (num_pairs + used * (block_size - 1)) // block_size
    sorted_ids = torch.full((max_blocks * block_size,), num_pairs, dtype=torch.long, device=device)
    sorted_ids[rows] = order
    row_of_pair = torch.empty(num_pairs, dtype=torch.long, device=device)
    row_of_pair[order] = rows
    block_experts = torch.full((max_blocks,), -1, dtype=torch.long, device=device)
    segment_experts = torch.repeat_interleave(torch.arange(num_experts, device=device),
                                              padded // block_size)
    block_experts[: segment_experts.numel()] = segment_experts

    as_int = lambda t: t.to(torch.int32)  # noqa: E731
    return {
        "sorted_ids": as_int(sorted_ids),
        "expert_offsets": as_int(offsets),
        "block_experts": as_int(block_experts),
        "num_rows_padded": as_int(offsets[-1:]),
        "row_of_pair": as_int(row_of_pair.reshape(num_tokens, top_k)),
        "tokens_per_expert": as_int(counts),
    }


def moe_permute_reference(x: torch.Tensor, sorted_ids: torch.Tensor, top_k: int,
                          topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """rows[r] = w[p] * x[p // top_k] for p = sorted_ids[r]; 0 where p is the padding sentinel."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_pairs = x.shape[0] * top_k
    real = sorted_ids.long() < num_pairs  # (rows,)
    pairs = torch.where(real, sorted_ids.long(), 0)
    rows = x.to(compute)[pairs // top_k] if num_pairs else x.new_zeros(pairs.shape[0], x.shape[1], dtype=compute)
    if topk_weights is not None and num_pairs:
        rows = rows * topk_weights.to(compute).reshape(-1)[pairs][:, None]
    return torch.where(real[:, None], rows, 0).to(x.dtype)


def moe_unpermute_reference(y: torch.Tensor, row_of_pair: torch.Tensor,
                            topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y[row_of_pair[t, j]], summed in float32 (float64 for
    float64 y) and rounded once to y's dtype."""
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    gathered = y.to(compute)[row_of_pair.long()]  # (tokens, top_k, hidden)
    if topk_weights is not None:
        gathered = gathered * topk_weights.to(compute)[:, :, None]
    return gathered.sum(dim=1).to(y.dtype)
