"""The position-wise layers of Qwen3 / Qwen3-MoE: RMSNorm, rotary tables, dense MLP, MoE block.

Module and parameter names equal transformers' so its ``state_dict`` loads directly:
``gate_proj`` / ``up_proj`` / ``down_proj`` for the dense MLP; ``gate`` (the router,
weight (E, H)) and ``experts.gate_up_proj`` (E, 2I, H, gate rows first) /
``experts.down_proj`` (E, H, I) for the MoE block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from livethinking import _extension
from livethinking.ops import fused_moe, moe_topk_softmax
from livethinking.ops.linear import linear

__all__ = ["DenseMLP", "MoeExperts", "RMSNorm", "RotaryEmbedding", "SparseMoeBlock",
           "apply_rotary"]

_NATIVE_RMS_NORM = _extension.compiled_library is not None  # the C++ op exists


class RMSNorm(nn.Module):
    """y = w · (x / sqrt(mean(x²) + eps)); the normalisation in fp32, as transformers does.

    ``forward(x, fast=True)`` (the engine's steps) without autograd on the CPU runs one C++
    op, ``torch.ops.livethinking.rms_norm`` (the ~9 tensor ops of the composite cost more
    than the arithmetic at decode sizes; its sum order differs, so the last bits may);
    otherwise torch's ``rms_norm``, the trainer's numerics."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        if (fast and x.device.type == "cpu" and x.dtype == self.weight.dtype and _NATIVE_RMS_NORM
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.ops.livethinking.rms_norm(x, self.weight, self.eps)
        # torch's rms_norm: x · rsqrt(mean(x²) + eps), the same ops in one call
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE with inverse frequencies θ^(-2i/d)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (B, T) int -> cos, signed sin (B, 1, T, head_dim) in ``dtype`` (computed
        in fp32; broadcast over heads). The sin table's first half is negated, the sign of
        rotate-half's ``−x₂``, so that :func:`apply_rotary` needs one ``roll``, not a
        negation and a concatenation, per call."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1).to(dtype)[:, None]
        return cos, torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D); cos, signed_sin (B, 1, T, D) from :class:`RotaryEmbedding`.

    Rotate-half RoPE, x·cos + (−x₂, x₁)·sin: ``roll`` by D/2 gives (x₂, x₁), and the sign of
    −x₂ sits in the table (negating a product is exact, so this equals the textbook form
    bit for bit)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class DenseMLP(nn.Module):
    """down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """``fast`` (the engine's steps): the projections by ``ops.linear``'s skinny GEMM."""
        if not fast:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = linear(x, self.gate_proj.weight, fast=True), linear(x, self.up_proj.weight, fast=True)
        return linear(F.silu(gate) * up, self.down_proj.weight, fast=True)


class MoeExperts(nn.Module):
    """The expert weights, fused as transformers stores them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x, topk_weights, topk_ids, fast: bool = False) -> torch.Tensor:
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
                         grouped=fast)


class SparseMoeBlock(nn.Module):
    """Router linear (model dtype) -> fp32 softmax top-k -> the fused expert layer.

    Returns the output (same shape as x), the router logits (tokens, E), which the
    load-balancing loss needs, and the expert ids used (tokens, k).

    Routing replay (``replay_ids`` (tokens, k), e.g. the experts the inference engine
    chose): those ids replace the top-k; the combine weights are the router's softmax at
    them, p_t[e] / Σ_j p_t[e_j] when ``norm_topk_prob`` (else p_t[e]), so the router still
    gets gradients through the weights of the experts actually used.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoeExperts(num_experts, hidden_size, intermediate_size)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor, replay_ids: torch.Tensor | None = None,
                fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(flat)  # (tokens, E)
        if replay_ids is None:
            _, topk_ids = moe_topk_softmax(router_logits, self.top_k,
                                           renormalize=self.norm_topk_prob)
        else:
            topk_ids = replay_ids.reshape(-1, self.top_k).to(device=flat.device,
                                                             dtype=torch.int32)  # (tokens, k)
        # one formula for the weights whoever chose the ids, so replaying a forward's own
        # routes reproduces it bit for bit
        probs = torch.softmax(router_logits.float(), dim=-1)  # (tokens, E)
        topk_weights = probs.gather(1, topk_ids.long())  # (tokens, k) fp32
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
        out = self.experts(flat, topk_weights, topk_ids, fast=fast)
        return out.reshape(x.shape), router_logits, topk_ids
