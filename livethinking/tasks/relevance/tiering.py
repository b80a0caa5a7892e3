"""Inference-time tiering from the label token's distribution (post-CoT deployment), and
the metrics it is tuned on.

In the post_cot format the label's digit is the first generated token, so one forward
pass over the prompt gives the four tiers' probabilities (:func:`label_token_ids`,
:func:`label_distribution`); the reasoning after it need not be generated at all.

Cumulative-probability tiering (:func:`cumpt`). TaoSR1 (arXiv 2508.12365) replaces
argmax decoding and per-tier thresholds by one threshold on the cumulative probability of
the higher tiers. This module reads it as: with ``S_k = p_k + ... + p_4`` (the probability
that the pair is tier k *or better*), the tier is the highest k with ``S_k >= tau``,
walking from 4-Excellent down. ``tau`` trades precision of the high tiers for their recall
with a single knob: tau = 0 gives 4 always; tau = 1 gives the lowest tier holding any mass;
tau = 0.5 gives the (upper) median tier. This reading was chosen from the paper's
description (one threshold, cumulative over the higher tiers), not from released code.
:func:`calibrate_tau` picks tau on a dev split by macro-F1 (the paper's metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from livethinking.tasks.relevance.responses import LABEL_TEXTS, TIERS, format_response

__all__ = ["CUMPT_TOLERANCE", "accuracy", "calibrate_tau", "cumpt", "label_distribution",
           "label_token_ids", "macro_f1"]

# S_k >= tau - CUMPT_TOLERANCE: tails are summed in float64 after normalising, so a tail
# that holds all the mass is 1 up to a few ulps (~1e-16); the tolerance keeps tau = 1 from
# being missed by roundoff while ignoring only mass below 1e-9.
CUMPT_TOLERANCE = 1e-9
_NUM_TIERS = len(TIERS)


def _check_probs(label_probs: torch.Tensor, name: str = "label_probs") -> torch.Tensor:
    if not isinstance(label_probs, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(label_probs).__name__}")
    if label_probs.ndim < 1 or label_probs.shape[-1] != _NUM_TIERS:
        raise ValueError(f"{name} must have shape (..., {_NUM_TIERS}), "
                         f"got {tuple(label_probs.shape)}")
    if not label_probs.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {label_probs.dtype}")
    p = label_probs.detach().to(torch.float64)
    if p.numel() and not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} must be finite")
    if p.numel() and bool((p < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    total = p.sum(-1, keepdim=True)
    if p.numel() and bool((total <= 0).any()):
        raise ValueError(f"every row of {name} needs a positive sum")
    return p / total


def _check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
            or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
    return float(tau)


def cumpt(label_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Tiers (int64, values 1..4, shape ``label_probs.shape[:-1]``) by cumulative-probability
    tiering: the highest k with ``p_k + ... + p_4 >= tau`` (module docstring).

    ``label_probs`` (..., 4): probabilities (or any non-negative weights) of tiers 1..4,
    index 0 = tier 1, normalised over the last dim here; ``tau`` in [0, 1]. Tier 1 always
    qualifies (S_1 = 1), so a tier exists for every row.
    """
    p = _check_probs(label_probs)
    tau = _check_tau(tau)
    tails = p.flip(-1).cumsum(-1).flip(-1)  # tails[..., i] = S_{i+1}
    ok = tails >= tau - CUMPT_TOLERANCE
    ok[..., 0] = True
    tiers = torch.arange(1, _NUM_TIERS + 1, device=p.device)
    return torch.where(ok, tiers, torch.zeros_like(tiers)).amax(-1)


def _check_labels(x: torch.Tensor | Sequence[int], name: str, num_classes: int,
                  lowest: int = 1) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.numel() == 0:  # torch.as_tensor([]) is float32
        t = t.to(torch.int64)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if t.numel() and (bool((t < lowest).any()) or bool((t > num_classes).any())):
        raise ValueError(f"{name} must hold classes {lowest}..{num_classes}")
    return t


def _pair(pred, gold, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    # pred 0: no label (an unparseable answer): wrong, a false negative of its gold class
    p, g = _check_labels(pred, "pred", num_classes, 0), _check_labels(gold, "gold", num_classes)
    if p.shape != g.shape:
        raise ValueError(f"pred and gold differ in size: {p.numel()} vs {g.numel()}")
    if p.numel() == 0:
        raise ValueError("pred and gold are empty")
    return p, g


def macro_f1(pred: torch.Tensor | Sequence[int], gold: torch.Tensor | Sequence[int],
             num_classes: int = _NUM_TIERS) -> float:
    """Macro-averaged F1 over classes 1..num_classes: per class
    ``F1 = 2·TP / (2·TP + FP + FN)``, averaged over the classes present in ``pred`` or
    ``gold`` (a class absent from both has no F1 and is excluded, not counted as 0 or 1).
    A ``pred`` of 0 is no label (an answer whose label did not parse): it is a false
    negative of its gold class and a false positive of none."""
    p, g = _pair(pred, gold, num_classes)
    scores = []
    for c in range(1, num_classes + 1):
        tp = int(((p == c) & (g == c)).sum())
        fp = int(((p == c) & (g != c)).sum())
        fn = int(((p != c) & (g == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def accuracy(pred: torch.Tensor | Sequence[int], gold: torch.Tensor | Sequence[int]) -> float:
    """The fraction of ``pred`` equal to ``gold`` (tiers 1..4; a ``pred`` of 0, no label, is
    wrong)."""
    p, g = _pair(pred, gold, _NUM_TIERS)
    return float((p == g).double().mean())


def calibrate_tau(label_probs: torch.Tensor, labels: torch.Tensor | Sequence[int], *,
                  grid: Sequence[float] | None = None) -> tuple[float, float]:
    """``(tau, macro_f1)``: the tau of ``grid`` (default 0, 0.01, ..., 1) whose
    :func:`cumpt` tiers score the highest macro-F1 against ``labels`` on ``label_probs``
    (N, 4), a dev split's. Ties go to the tau closest to 0.5 (the median tier, the
    unbiased reading), then to the smaller tau."""
    p = _check_probs(label_probs)
    if p.ndim != 2:
        raise ValueError(f"label_probs must have shape (N, 4), got {tuple(p.shape)}")
    gold = _check_labels(labels, "labels", _NUM_TIERS)
    if gold.numel() != p.shape[0]:
        raise ValueError(f"got {p.shape[0]} distributions but {gold.numel()} labels")
    taus = [i / 100 for i in range(101)] if grid is None else [_check_tau(t) for t in grid]
    if not taus:
        raise ValueError("grid is empty")
    best = None
    for tau in taus:
        score = macro_f1(cumpt(p, tau), gold)
        key = (-score, abs(tau - 0.5), tau)
        if best is None or key < best[0]:
            best = (key, tau, score)
    return best[1], best[2]


def label_token_ids(tokenizer) -> list[int]:
    """The token ids of the labels' digits ``"1"``..``"4"`` (index 0 = tier 1), each as the
    first token of a post_cot response. ValueError when a digit is not one token, or when
    a response's first token is not its digit alone (a tokenizer that merges the digit with
    the ``-`` after it cannot be read at one position)."""
    ids = []
    for k in sorted(TIERS):
        encoded = tokenizer.encode(LABEL_TEXTS[k], add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"label {LABEL_TEXTS[k]!r} is not a single token: {encoded}")
        response = tokenizer.encode(format_response(k, "x", "post_cot"), add_special_tokens=False)
        if not response or response[0] != encoded[0]:
            raise ValueError(f"a post_cot response for tier {k} does not start with the token "
                             f"of {LABEL_TEXTS[k]!r} ({encoded[0]}): {response[:3]}")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"the label tokens are not distinct: {ids}")
    return ids


def label_distribution(logits_at_first_position: torch.Tensor,
                       token_ids: Sequence[int]) -> torch.Tensor:
    """The tiers' probabilities (..., 4) from the logits (..., V) at the first response
    position: a softmax, in float32, over the four label tokens' logits only (the
    distribution conditioned on the response starting with a label; the mass the model
    puts elsewhere is dropped, not spread). ``token_ids`` as :func:`label_token_ids` gives."""
    logits = logits_at_first_position
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1:
        raise ValueError("logits_at_first_position must be a tensor of shape (..., V)")
    ids = [int(i) for i in token_ids]
    if len(ids) != _NUM_TIERS:
        raise ValueError(f"need {_NUM_TIERS} token ids, got {len(ids)}")
    vocab = logits.shape[-1]
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"token ids {ids} out of range for a vocabulary of {vocab}")
    index = torch.tensor(ids, device=logits.device)
    return torch.softmax(logits.index_select(-1, index).float(), dim=-1)
