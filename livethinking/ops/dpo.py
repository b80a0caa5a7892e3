"""The DPO loss (Rafailov et al., 2023) of paired completions, with conservative-DPO
label smoothing (cDPO), from per-sequence summed log-probs.

For a pair i, with policy log-probs π_c, π_r and reference log-probs ref_c, ref_r of the
chosen and rejected completions (each summed over the completion's tokens):

    h_i    = (π_c − ref_c) − (π_r − ref_r)
    loss_i = −(1 − ε)·logσ(β·h_i) − ε·logσ(−β·h_i)          ε = label_smoothing
    loss   = mean_i loss_i

This is TRL's ``DPOTrainer`` loss with ``loss_type="sigmoid"`` and
``f_divergence_type="reverse_kl"``: trl 1.16.0, ``trl/trainer/dpo_trainer.py``,
``DPOTrainer._compute_loss``, lines 1350–1351 (the log ratios), 1383 (h), 1387–1388
(``per_sequence_loss = -F.logsigmoid(self.beta * delta_score)``) and 1528 (the mean); the
same sigmoid line is 1434–1435 at huggingface/trl@f2cd577. TRL 1.16 ignores
``label_smoothing`` for ``"sigmoid"``: the ε terms above are its sigmoid branch up to v0.28
(``DPOTrainer.dpo_loss``, lines 1152–1156 at huggingface/trl@a68fb89), dropped by "Refactor
DPO (#3906)" (e3b7897). At ε = 0, the default, the two agree; for ε > 0 (cDPO) TRL 1.16
gives the same loss as its weighted mixture 2(1 − ε)·"sigmoid" − (1 − 2ε)·"robust".

The statistics are TRL's metrics (lines 1582–1601): rewards r_c = β·(π_c − ref_c),
r_r = β·(π_r − ref_r); ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (r_c − r_r)
and ``rewards/accuracies`` (r_c > r_r, strict) are batch means, as are ``logps/chosen`` (π_c)
and ``logps/rejected`` (π_r). The math is O(B); logσ is ``F.logsigmoid``, finite for any
finite β·h.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss", "STAT_NAMES"]

STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected")

_ARG_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta, label_smoothing=0.0):
    """DPO / cDPO loss (see the module docstring) of B pairs given as 1-D tensors (B,) of
    per-sequence summed log-probs, all four of one floating dtype and device.

    Computes in float32, or float64 for float64 inputs (bf16/fp16 inputs are upcast).
    Returns (loss, stats): a 0-d loss in that dtype, differentiable in the two policy
    tensors only (the reference log-probs are detached), and a dict of python floats keyed
    by ``STAT_NAMES``.
    """
    _check(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
           beta, label_smoothing)
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    chosen_logratios = chosen - ref_chosen_logps.detach().to(dtype)
    rejected_logratios = rejected - ref_rejected_logps.detach().to(dtype)
    scaled = beta * (chosen_logratios - rejected_logratios)  # β·h, (B,)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(scaled)
    if label_smoothing:
        per_pair = per_pair - label_smoothing * F.logsigmoid(-scaled)
    loss = per_pair.mean()

    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        means = torch.stack([chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                             (chosen_rewards > rejected_rewards).to(dtype), chosen, rejected]).mean(dim=1)
        stats = dict(zip(STAT_NAMES, means.tolist()))  # one host sync
    return loss, stats


def _check(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
           label_smoothing) -> None:
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, t in zip(_ARG_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B,), got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    first = policy_chosen_logps
    if first.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D (B,) per-sequence log-probs, "
                         f"got shape {tuple(first.shape)}")
    if first.shape[0] == 0:
        raise ValueError("policy_chosen_logps must hold at least one pair (B >= 1), got B = 0")
    for name, t in zip(_ARG_NAMES[1:], tensors[1:]):
        if t.shape != first.shape:
            raise ValueError(f"{name} must have shape {tuple(first.shape)} like policy_chosen_logps, "
                             f"got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have dtype {first.dtype} like policy_chosen_logps, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} must be on {first.device} like policy_chosen_logps, got {t.device}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a real number, got {type(label_smoothing).__name__}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
