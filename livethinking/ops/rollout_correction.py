"""Rollout importance correction: reweighting samples drawn by an inference engine whose
probabilities differ from the trainer's (numerics, routing, staleness).

With o_t the trainer's old-policy log-prob of sampled token t, s_t the sampler's, m_t the
completion mask and r_t = exp(o_t − s_t) (sequence level: r = exp(Σ_t m_t (o_t − s_t)),
the same for every token of the sequence), the per-token weights w_t are

- ``token_tis`` / ``seq_tis`` (truncated IS; TRL's ``token_truncate`` /
  ``sequence_truncate`` with ``vllm_importance_sampling_cap``): w = min(r, cap);
- ``token_mis`` / ``seq_mis`` (masked IS; verl's ``mask`` with lower/upper thresholds):
  w = r · 1[low ≤ r ≤ high], so an outlier token (sequence) leaves the loss;
- ``none``: no weights.

Each weight multiplies its token's policy-loss term (detached; the gradient flows through
the policy ratio only) and is 0 where m_t = 0. Diagnostics over the masked tokens:
``kl_k3`` = mean(r_t − 1 − log r_t) with the token-level r_t (Schulman's k3 estimate of
KL(sampler ‖ trainer) from the sampler's samples), ``logprob_abs_diff`` = mean |o_t − s_t|
and its max, and the fraction of tokens capped (TIS: r > cap) or masked (MIS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CORRECTION_MODES", "CorrectionStats", "rollout_correction"]

CORRECTION_MODES = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis")


@dataclass(slots=True)
class CorrectionStats:
    """Diagnostics of one batch (floats, over the masked tokens)."""

    kl_k3: float
    logprob_abs_diff: float
    logprob_abs_diff_max: float
    frac_capped: float
    frac_masked: float

    def as_dict(self, prefix: str = "rollout_is/") -> dict[str, float]:
        return {f"{prefix}{k}": getattr(self, k) for k in self.__slots__}


def rollout_correction(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                       mask: torch.Tensor, *, mode: str = "token_tis", cap: float = 2.0,
                       low: float = 0.5, high: float = 2.0
                       ) -> tuple[torch.Tensor | None, CorrectionStats]:
    """The weights (B, T) float32 of the module's formulas (None for ``none``) and the
    diagnostics. old_logprobs, sampler_logprobs, mask: (B, T)."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"mode must be one of {', '.join(CORRECTION_MODES)}, got {mode!r}")
    if old_logprobs.shape != sampler_logprobs.shape or old_logprobs.shape != mask.shape \
            or old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs, sampler_logprobs and mask must be the same (B, T), "
                         f"got {tuple(old_logprobs.shape)}, {tuple(sampler_logprobs.shape)} "
                         f"and {tuple(mask.shape)}")
    if not (cap > 0 and 0 <= low <= high and math.isfinite(cap) and math.isfinite(high)):
        raise ValueError(f"need cap > 0 and 0 <= low <= high (finite), got cap={cap}, "
                         f"low={low}, high={high}")
    m = mask.float()
    # masked positions get a zero difference, so padding cannot overflow the exponentials
    diff = torch.where(mask.bool(), old_logprobs.float() - sampler_logprobs.float(),
                       torch.zeros((), device=mask.device))  # (B, T)
    token_ratio = diff.exp()
    if mode.startswith("seq"):
        ratio = diff.sum(-1, keepdim=True).exp().expand_as(diff)  # (B, T), one per row
    else:
        ratio = token_ratio
    count = m.sum().clamp(min=1.0)
    kept = m.bool()
    capped = masked = torch.zeros((), device=mask.device)
    weights = None
    if mode.endswith("tis"):
        capped = ((ratio > cap) & kept).float().sum() / count
        weights = ratio.clamp(max=cap) * m
    elif mode.endswith("mis"):
        outside = (ratio < low) | (ratio > high)
        masked = (outside & kept).float().sum() / count
        weights = torch.where(outside, torch.zeros((), device=mask.device), ratio) * m
    k3 = (token_ratio - 1.0 - diff) * m
    stats = CorrectionStats(
        kl_k3=float(k3.sum() / count), logprob_abs_diff=float((diff.abs() * m).sum() / count),
        logprob_abs_diff_max=float(diff.abs().max()) if diff.numel() else 0.0,
        frac_capped=float(capped), frac_masked=float(masked))
    return weights, stats
