"""The GRPO family of policy losses from hidden states, and group-normalised advantages.

For completion tokens with current log-prob ``logp`` (from ``fused_linear_logprobs``:
no N×V logits), old log-prob ``old`` (``None``: on-policy, old = logp detached) and
advantage A:

    l = logp − old              per token, or (GSPO, importance_sampling_level="sequence")
                                the masked mean of l over the sequence, on each of its tokens,
                                or (IPA, importance_sampling_level="chunk") the masked mean of
                                l over the token's chunk c (chunk_ids): r_c = (Π_{t∈c} r_t)^(1/|c|)
    r = exp(l)
    loss_t = −min(min(r, δ)·A, clamp(r, 1 − ε_low, 1 + ε_high)·A)      (δ = ∞ unless given)
    cispo:  loss_t = −sg(min(r, 1 + ε_high))·A·logp      (MiniMax-M1's form: the cap is 1 + ε_high)
    loss_t *= rollout_is_weights                                      (when given)
    loss_t += β·KL_t(logp ‖ ref)   k1: logp − ref,  k2: ½(logp − ref)²,  k3: e^(ref−logp) − (ref−logp) − 1

aggregated over the completion mask: grpo (mean per sequence, then over sequences),
bnpo (sum / masked tokens), dr_grpo (sum / (B · max_completion_length)), dapo and cispo
(sum / num_items_in_batch, default the local masked-token count), chunk (IPA:
Σ_c mean_{t∈c} loss_t / num_items_in_batch, default the local count of non-empty chunks).

Chunks (IPA, "Interaction-Perceptive Agentic Policy Optimization" of ALE/ROME) are the
semantic interaction units of a multi-turn trajectory: here one chunk is one model turn,
named per token by ``chunk_ids`` (B, T) and local to its row. Implemented from IPA: the
chunk-level importance ratio (geometric mean of the chunk's token ratios, clipped like GSPO's
sequence ratio) and per-chunk loss normalisation. Left out: chunk-level value or reward
shaping and discounting across chunks (advantages stay trajectory-level, from group
normalisation), resampling or masking chunks by their ratio, and the backward scan for
decisive interactions.

CISPO's cap differs from TRL's: TRL's ``GRPOTrainer`` computes
``clamped_ratios = torch.clamp(coef_1, max=self.epsilon_high).detach()``, i.e. the cap is
``epsilon_high`` itself, while here, as in the MiniMax-M1 paper (r̂ = clip(r, 1 − ε_low^IS,
1 + ε_high^IS), only the upper bound kept), it is ``1 + epsilon_high``: TRL's
``epsilon_high=e`` is ``epsilon_high=e − 1`` here.

The token-level math costs O(B·T); the vocabulary pass is the fused log-prob op, whose backward takes
the gradient of this loss with respect to logp.
"""

from __future__ import annotations

import torch

from livethinking.ops.fused_token_loss import fused_linear_token_loss
from livethinking.ops.logprobs import _check as check_logprob_inputs
from livethinking.ops.logprobs import fused_linear_logprobs

__all__ = ["fused_linear_grpo_loss", "group_advantages", "LOSS_TYPES"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "chunk")
IS_LEVELS = ("token", "sequence", "chunk")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _chunk_index(chunk_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense chunk indices (B, T) long of the (row, chunk id) pairs at masked positions, in
    [0, C) where the mask is 1 and C (a spare slot) where it is 0, and C, the number of
    non-empty chunks. One host sync (C is data-dependent)."""
    batch, length = chunk_ids.shape
    keep = mask.reshape(-1) > 0
    rows = torch.arange(batch, device=chunk_ids.device).repeat_interleave(length)  # (B·T,)
    pairs = torch.stack([rows[keep], chunk_ids.reshape(-1)[keep].long()], dim=1)  # (N, 2)
    if pairs.shape[0] == 0:
        return torch.zeros(batch, length, dtype=torch.long, device=chunk_ids.device), 0
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    count = unique.shape[0]
    index = torch.full((batch * length,), count, dtype=torch.long, device=chunk_ids.device)
    index[keep] = inverse
    return index.reshape(batch, length), count


def _chunk_sums(values: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """Σ of values (B, T) over each chunk: (C + 1,), the last slot the unmasked positions'."""
    return values.new_zeros(count + 1).index_add(0, index.reshape(-1), values.reshape(-1))


def _kl(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    diff = ref - logp
    if estimator == "k1":
        return -diff
    if estimator == "k2":
        return 0.5 * diff**2
    return torch.exp(diff) - diff - 1


def fused_linear_grpo_loss(hidden, weight, targets, completion_mask, advantages, *,
                           old_logprobs=None, ref_logprobs=None, bias=None, temperature=1.0,
                           beta=0.0, epsilon_low=0.2, epsilon_high=None, delta=None,
                           loss_type="dapo", importance_sampling_level="token",
                           max_completion_length=None, num_items_in_batch=None, kl_estimator="k3",
                           rollout_is_weights=None, chunk_ids=None):
    """GRPO-family policy loss (see the module docstring) of completions given as hidden
    states (B, T, H) under the lm_head ``weight`` (V, H) [+ ``bias``].

    Returns (loss, stats): a scalar float32 loss differentiable in hidden, weight and bias,
    and a dict of detached statistics: ``logprobs`` (B, T) float32 (0 where the mask is 0:
    those rows cost no GEMM work, as ``fused_linear_logprobs`` says), ``entropy``, ``kl``,
    ``clip_ratio_low`` (r < 1 − ε_low, A < 0; always 0 for cispo, which clips above
    only), ``clip_ratio_high`` (r > 1 + ε_high, A > 0), ``clip_ratio_region`` (either) and
    ``ratio`` (masked means), and ``num_chunks`` (the local count of non-empty chunks) when
    ``chunk_ids`` is given.

    ``chunk_ids`` (B, T) integer: the chunk (model turn, IPA's interaction chunk) of every
    completion token, read only where ``completion_mask`` is 1. Chunks are per row (id 0 of
    row 0 and id 0 of row 1 differ), need not be contiguous (environment tokens between
    turns are masked out) and their ids need not be consecutive. Needed by
    ``importance_sampling_level="chunk"``: each token's log-ratio is the masked mean of
    logp − old over its chunk (r_c, the geometric mean of the chunk's token ratios, with the
    gradient through the mean as for "sequence"), then clipped with ε_low/ε_high (and
    δ) as usual; and by ``loss_type="chunk"``: loss = Σ_c mean_{t∈c} loss_t / D, D =
    ``num_items_in_batch`` (the global chunk count when the caller splits a batch into
    microbatches) or else the local number of non-empty chunks (at least 1); an all-masked
    row has no chunk. Advantages stay as given (trajectory-level): no per-chunk credit
    shaping, discounting or chunk resampling (see the module docstring).
    """
    batch, length = _check(hidden, weight, targets, completion_mask, advantages, old_logprobs,
                           ref_logprobs, beta, epsilon_low, loss_type, importance_sampling_level,
                           kl_estimator, rollout_is_weights, delta, max_completion_length,
                           chunk_ids)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.to(torch.float32)
    adv = advantages.float()[:, None] if advantages.dim() == 1 else advantages.float()
    if chunk_ids is not None:
        chunk_index, num_chunks = _chunk_index(chunk_ids, mask)  # (B, T) in [0, C], C
        chunk_tokens = _chunk_sums(mask, chunk_index, num_chunks).clamp(min=1)  # (C + 1,)

    def loss_and_stats(logp, entropy=None):
        """The loss of logp (B, T) and, given the entropy, the statistics (else None)."""
        old = logp.detach() if old_logprobs is None else old_logprobs.float()
        log_ratio = logp - old
        if importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1, keepdim=True)
                         / mask.sum(-1, keepdim=True).clamp(min=1)).expand(batch, length)
        if importance_sampling_level == "chunk":  # each token gets its chunk's mean log-ratio
            log_ratio = (_chunk_sums(log_ratio * mask, chunk_index, num_chunks)
                         / chunk_tokens)[chunk_index]  # (B, T)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if loss_type == "cispo":
            per_token = -torch.clamp(ratio, max=1 + epsilon_high).detach() * adv * logp
        else:
            unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
            per_token = -torch.min(unclipped * adv, clipped * adv)
        if rollout_is_weights is not None:
            per_token = per_token * rollout_is_weights.float()
        kl = None
        if beta > 0:
            kl = _kl(logp, ref_logprobs.float(), kl_estimator)
            per_token = per_token + beta * kl
        elif ref_logprobs is not None:
            kl = _kl(logp.detach(), ref_logprobs.float(), kl_estimator)

        masked_sum = (per_token * mask).sum()
        if loss_type == "grpo":
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        elif loss_type == "bnpo":
            loss = masked_sum / mask.sum().clamp(min=1)
        elif loss_type == "dr_grpo":
            loss = masked_sum / (batch * (max_completion_length or length))
        elif loss_type == "chunk":
            chunk_means = _chunk_sums(per_token * mask, chunk_index, num_chunks)[:num_chunks] \
                / chunk_tokens[:num_chunks]  # (C,)
            denominator = max(num_chunks, 1) if num_items_in_batch is None else num_items_in_batch
            loss = chunk_means.sum() / denominator
        else:  # dapo, cispo
            denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            loss = masked_sum / denominator

        if entropy is None:
            return loss, None
        with torch.no_grad():
            high = (ratio > 1 + epsilon_high) & (adv > 0)
            # CISPO caps the weight above only: nothing is clipped below (TRL's and Liger's
            # cispo clip ratio count ``ratio > cap and A > 0`` alone)
            low = torch.zeros_like(high) if loss_type == "cispo" else (ratio < 1 - epsilon_low) & (adv < 0)
            stats = {
                "logprobs": logp.detach(),
                "entropy": _masked_mean(entropy, mask),
                "kl": _masked_mean(kl.detach(), mask) if kl is not None else torch.zeros(()),
                "clip_ratio_low": _masked_mean(low.float(), mask),
                "clip_ratio_high": _masked_mean(high.float(), mask),
                "clip_ratio_region": _masked_mean((low | high).float(), mask),
                "ratio": _masked_mean(ratio.detach(), mask),
            }
            if chunk_ids is not None:
                stats["num_chunks"] = torch.tensor(float(num_chunks), device=mask.device)
        return loss, stats

    flat = dict(bias=bias, temperature=temperature, row_mask=completion_mask.reshape(-1).bool())
    if _gradient_in_forward(hidden, weight, bias, importance_sampling_level):
        check_logprob_inputs(hidden.reshape(batch * length, -1), weight, targets.reshape(-1),
                             bias, temperature, flat["row_mask"])
        loss, logp, entropy = fused_linear_token_loss(
            hidden.reshape(batch * length, -1), weight, targets.reshape(-1),
            lambda lp: loss_and_stats(lp.reshape(batch, length))[0], **flat)
        with torch.no_grad():
            _, stats = loss_and_stats(logp.reshape(batch, length), entropy.reshape(batch, length))
        return loss, stats
    logp, entropy = fused_linear_logprobs(
        hidden.reshape(batch * length, -1), weight, targets.reshape(-1), return_entropy=True,
        **flat)
    return loss_and_stats(logp.reshape(batch, length), entropy.detach().reshape(batch, length))


def _gradient_in_forward(hidden, weight, bias, importance_sampling_level) -> bool:
    """Whether the three-GEMM path runs (``fused_token_loss``): a token-local loss (token
    importance ratios), a gradient wanted, and the chunked PyTorch path (CPU, or fp64)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    chunked = not hidden.is_cuda or hidden.dtype == torch.float64
    return wants_grad and chunked and importance_sampling_level == "token"


def _check(hidden, weight, targets, completion_mask, advantages, old_logprobs, ref_logprobs, beta,
           epsilon_low, loss_type, importance_sampling_level, kl_estimator, rollout_is_weights,
           delta, max_completion_length, chunk_ids) -> tuple[int, int]:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a 3-D tensor (B, T, H), got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    batch, length, _ = hidden.shape
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    for name, t in (("targets", targets), ("completion_mask", completion_mask),
                    ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("rollout_is_weights", rollout_is_weights)):
        if t is not None and tuple(t.shape) != (batch, length):
            raise ValueError(f"{name} must have shape ({batch}, {length}) like hidden's (B, T), "
                             f"got {tuple(t.shape)}")
    if advantages.shape not in ((batch,), (batch, length)):
        raise ValueError(f"advantages must have shape ({batch},) or ({batch}, {length}), "
                         f"got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (B, T) from the reference model")
    if not 0 <= epsilon_low < 1:
        raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low}")
    if delta is not None and delta <= 1:
        raise ValueError(f"delta must be > 1 (an upper bound on the ratio), got {delta}")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if chunk_ids is None:
        if importance_sampling_level == "chunk":
            raise ValueError("importance_sampling_level='chunk' needs chunk_ids (B, T): the "
                             "chunk (model turn) of every completion token")
        if loss_type == "chunk":
            raise ValueError("loss_type='chunk' needs chunk_ids (B, T): the chunk (model turn) "
                             "of every completion token")
    else:
        if not isinstance(chunk_ids, torch.Tensor):
            raise ValueError(f"chunk_ids must be a (B, T) integer tensor, "
                             f"got {type(chunk_ids).__name__}")
        if tuple(chunk_ids.shape) != tuple(completion_mask.shape):
            raise ValueError(f"chunk_ids must have shape {tuple(completion_mask.shape)} like "
                             f"completion_mask's, got {tuple(chunk_ids.shape)}")
        if chunk_ids.is_floating_point() or chunk_ids.is_complex() or chunk_ids.dtype == torch.bool:
            raise ValueError(f"chunk_ids must have an integer dtype, got {chunk_ids.dtype}")
    return batch, length


def group_advantages(rewards: torch.Tensor, group_size: int, *, reward_weights=None,
                     scale: str = "group", aggregation: str = "sum_then_normalize",
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages (B,) of B = groups × group_size completions, consecutive per group.

    rewards (B,) or (B, R) with R reward components weighted by ``reward_weights`` (R,)
    (default 1). ``sum_then_normalize``: r = Σ_c w_c r_c, then (r − group mean) / (std +
    eps); ``normalize_then_sum``: each component normalised that way in its group, then
    the weighted sum. std: over the group (``group``), the whole batch (``batch``, Lite
    PPO), or none (``none``: only the group mean is subtracted). Unbiased std, as TRL.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
        raise ValueError(f"aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
                         f"got {aggregation!r}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (B,) or (B, R), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
            or rewards.shape[0] % group_size:
        raise ValueError(f"group_size must be a positive int dividing B = {rewards.shape[0]}, "
                         f"got {group_size}")
    values = rewards.float() if rewards.dim() == 2 else rewards.float()[:, None]  # (B, R)
    weights = torch.ones(values.shape[1], device=values.device) if reward_weights is None \
        else torch.as_tensor(reward_weights, dtype=torch.float32, device=values.device)
    if weights.shape != (values.shape[1],):
        raise ValueError(f"reward_weights must have shape ({values.shape[1]},), got {tuple(weights.shape)}")

    def normalise(r: torch.Tensor) -> torch.Tensor:  # r: (B, C)
        grouped = r.reshape(-1, group_size, r.shape[1])
        centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(r.shape)
        if scale == "none":
            return centred
        if scale == "group":
            std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(r.shape) \
                if group_size > 1 else torch.zeros_like(r)
        else:
            std = r.std(dim=0, keepdim=True) if r.shape[0] > 1 else torch.zeros_like(r[:1])
        return centred / (std + eps)

    if aggregation == "sum_then_normalize":
        return normalise((values * weights).sum(dim=1, keepdim=True))[:, 0]
    return (normalise(values) * weights).sum(dim=1)
