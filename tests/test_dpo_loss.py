"""dpo_loss against an fp64 plain-PyTorch reference of the formula, and against TRL 1.16's
own DPOTrainer loss code run on the same log-probs."""

import itertools
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import livethinking.ops
from livethinking.ops import dpo_loss
from livethinking.ops.dpo import STAT_NAMES

U32 = 2.0**-24  # float32 unit roundoff: the op computes in float32


def reference(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0):
    """The formula as written in the DPO / cDPO papers, in float64, pair by pair; returns
    (loss, stats, scale, grad_scale): the per-pair magnitudes that bound float32 rounding."""
    chosen, rejected, ref_chosen, ref_rejected = (
        t.detach().double() for t in (chosen, rejected, ref_chosen, ref_rejected))
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    agree, flip = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
    loss = (-(1 - label_smoothing) * agree - label_smoothing * flip).mean()
    grad_chosen, grad_rejected = torch.autograd.grad(loss, (chosen, rejected))
    r_chosen, r_rejected = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    stats = {"rewards/chosen": r_chosen.mean().item(), "rewards/rejected": r_rejected.mean().item(),
             "rewards/margins": (r_chosen - r_rejected).mean().item(),
             "rewards/accuracies": (r_chosen > r_rejected).double().mean().item(),
             "logps/chosen": chosen.detach().mean().item(), "logps/rejected": rejected.detach().mean().item()}
    # float32 rounds each log ratio (|π − ref| ulps), β·h, logσ and the weighted sum: each
    # error, carried to the loss (|dlogσ/dx| <= 1) or to the gradient (|dσ/dx| <= 1/4 per
    # unit of β·h), is a few units of these magnitudes
    ratios = beta * ((chosen - ref_chosen).abs() + (rejected - ref_rejected).abs()).detach()
    scale = ratios + (1 - label_smoothing) * agree.abs().detach() + label_smoothing * flip.abs().detach()
    grad_scale = beta / h.numel() * (1 + ratios)
    return loss.detach(), grad_chosen, grad_rejected, stats, scale, grad_scale


def make_pairs(batch, dtype, generator, spread=3.0):
    """Random summed log-probs (B,) of typical size (−300..−1); the reference differs from
    the policy by ~``spread`` nats, so β·h spans the curved part of logσ."""
    policy = -(1 + 300 * torch.rand(2, batch, generator=generator, dtype=torch.float64))
    ref = policy + spread * torch.randn(2, batch, generator=generator, dtype=torch.float64)
    return [t.to(dtype) for t in (policy[0], policy[1], ref[0], ref[1])]


def run_op(pairs, *, beta, label_smoothing=0.0):
    chosen, rejected, ref_chosen, ref_rejected = (t.clone().requires_grad_(True) for t in pairs)
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                           label_smoothing=label_smoothing)
    loss.backward()
    return loss, stats, chosen.grad, rejected.grad, (ref_chosen.grad, ref_rejected.grad)


def check_against_reference(pairs, *, beta, label_smoothing, dtype):
    loss, stats, grad_chosen, grad_rejected, ref_grads = run_op(pairs, beta=beta,
                                                                label_smoothing=label_smoothing)
    want, want_chosen, want_rejected, want_stats, scale, grad_scale = reference(
        *pairs, beta=beta, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32 and loss.shape == ()
    budget = 8 * U32 * scale.mean().item()
    assert abs(loss.item() - want.item()) <= budget, (loss.item(), want.item(), budget)
    # gradients come back in the input dtype: one more rounding to that dtype (subnormals included)
    info = torch.finfo(dtype)
    cast = 0.0 if dtype == torch.float32 else info.eps
    for got, ref in ((grad_chosen, want_chosen), (grad_rejected, want_rejected)):
        assert got.dtype == dtype
        err = (got.double() - ref).abs()
        bound = 8 * U32 * grad_scale + cast * (ref.abs() + info.tiny)
        assert bool((err <= bound).all()), f"max grad error {err.max().item()} vs budget {bound.max().item()}"
    assert ref_grads == (None, None), "a gradient reached the reference log-probs"
    assert set(stats) == set(STAT_NAMES) and all(type(v) is float for v in stats.values())
    reward_budget = 8 * U32 * (scale.mean().item() + beta)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(stats[name] - want_stats[name]) <= reward_budget, (name, stats[name], want_stats[name])
    # k / B, rounded to float32
    assert stats["rewards/accuracies"] == pytest.approx(want_stats["rewards/accuracies"], rel=U32)
    for name in ("logps/chosen", "logps/rejected"):
        assert stats[name] == pytest.approx(want_stats[name], rel=8 * U32)


@pytest.mark.parametrize("batch,dtype,label_smoothing", list(itertools.product(
    (1, 7, 97), (torch.float32, torch.bfloat16, torch.float16), (0.0, 0.1))))
def test_matches_fp64_reference(batch, dtype, label_smoothing, generator):
    # low-precision inputs: the reference is computed on the same rounded values
    pairs = make_pairs(batch, dtype, generator)
    beta = 0.05 + 0.45 * torch.rand((), generator=generator).item()
    check_against_reference(pairs, beta=beta, label_smoothing=label_smoothing, dtype=dtype)


@pytest.mark.parametrize("label_smoothing", (0.0, 0.1))
def test_large_margins_stay_finite(label_smoothing, generator):
    """β·h = ±200 saturates σ: logσ must not overflow to −inf, nor the gradient to nan."""
    batch, beta = 6, 0.1
    chosen = -(1 + 300 * torch.rand(batch, generator=generator, dtype=torch.float64))
    rejected = -(1 + 300 * torch.rand(batch, generator=generator, dtype=torch.float64))
    h = torch.tensor([2000.0, -2000.0, 2000.0, -2000.0, 1500.0, -1800.0], dtype=torch.float64)
    pairs = [t.float() for t in (chosen, rejected, chosen - h, rejected)]  # h = (π_c − ref_c) − 0
    loss, stats, grad_chosen, grad_rejected, _ = run_op(pairs, beta=beta, label_smoothing=label_smoothing)
    assert torch.isfinite(loss) and torch.isfinite(grad_chosen).all() and torch.isfinite(grad_rejected).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    check_against_reference(pairs, beta=beta, label_smoothing=label_smoothing, dtype=torch.float32)


def test_ties_are_not_accurate():
    """``rewards/accuracies`` counts r_c > r_r strictly, as TRL does: a tie is a miss."""
    chosen = torch.tensor([-5.0, -7.0, -3.0])
    rejected = torch.tensor([-6.0, -7.0, -2.0])
    ref_chosen = torch.tensor([-5.0, -8.0, -4.0])
    ref_rejected = torch.tensor([-6.0, -8.0, -4.0])  # log ratios: (0, 0), (1, 1), (1, 2)
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    assert stats["rewards/accuracies"] == 0.0
    assert stats["rewards/margins"] == pytest.approx(-0.5 / 3)
    assert loss.item() == pytest.approx((2 * torch.log(torch.tensor(2.0)).item()
                                         - F.logsigmoid(torch.tensor(-0.5)).item()) / 3)


def test_float64_inputs_stay_float64(generator):
    pairs = make_pairs(5, torch.float64, generator)
    loss, _ = dpo_loss(*pairs, beta=0.2, label_smoothing=0.05)
    want = reference(*pairs, beta=0.2, label_smoothing=0.05)[0]
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_exported():
    assert "dpo_loss" in livethinking.ops.__all__ and livethinking.ops.dpo_loss is dpo_loss


def _bad_cases():
    good = [torch.full((3,), -1.0) for _ in range(4)]
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")

    def replace(index, value):
        return [value if i == index else t for i, t in enumerate(good)], {"beta": 0.1}

    cases = []
    for i, name in enumerate(names):
        cases += [
            (replace(i, [-1.0, -1.0, -1.0]), TypeError, f"{name} must be a torch.Tensor"),
            (replace(i, torch.full((3,), -1, dtype=torch.int64)), TypeError, f"{name} must have a floating"),
        ]
        if i:
            cases += [
                (replace(i, torch.full((4,), -1.0)), ValueError, f"{name} must have shape \\(3,\\)"),
                (replace(i, torch.full((3,), -1.0, dtype=torch.float64)), TypeError,
                 f"{name} must have dtype torch.float32"),
                (replace(i, torch.full((3,), -1.0, device="meta")), ValueError, f"{name} must be on cpu"),
            ]
    cases += [
        (replace(0, torch.full((3, 1), -1.0)), ValueError, "policy_chosen_logps must be 1-D"),
        (([torch.empty(0)] * 4, {"beta": 0.1}), ValueError,
         "policy_chosen_logps must hold at least one pair"),
    ]
    for beta, error in ((0.0, ValueError), (-0.1, ValueError), (float("inf"), ValueError),
                        (float("nan"), ValueError), (True, TypeError), ("0.1", TypeError)):
        cases.append(((good, {"beta": beta}), error, "beta must be"))
    for smoothing, error in ((-0.01, ValueError), (0.5, ValueError), (float("nan"), ValueError),
                             (None, TypeError)):
        cases.append(((good, {"beta": 0.1, "label_smoothing": smoothing}), error, "label_smoothing must be"))
    return cases


@pytest.mark.parametrize("args,error,match", _bad_cases())
def test_bad_inputs_name_the_argument(args, error, match):
    tensors, kwargs = args
    with pytest.raises(error, match=match):
        dpo_loss(*tensors, **kwargs)


# ---- TRL 1.16 itself ----------------------------------------------------------------------

def trl_loss(pairs, *, beta, loss_type, loss_weights=None, label_smoothing=0.0):
    """TRL's own ``DPOTrainer.compute_loss`` (trl 1.16.0) on these log-probs, called unbound
    with a stand-in ``self`` carrying exactly the attributes it reads on the
    precomputed-reference path, and a stand-in model whose per-token log-probs are one
    completion token per row holding the summed log-prob, so TRL's sum over tokens returns
    it unchanged. Returns (loss, TRL's logged metrics, grad chosen, grad rejected)."""
    from trl.trainer.dpo_trainer import DPOTrainer  # CI installs trl and its deps (README)

    chosen, rejected = (t.clone().requires_grad_(True) for t in pairs[:2])
    ref_chosen, ref_rejected = pairs[2:]
    rows = 2 * chosen.shape[0]  # TRL's batch is [chosen; rejected]
    log_probs = torch.cat([chosen, rejected])[:, None]  # (2B, 1)
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(rows, 1),
                                    mean_logits=torch.zeros(rows, 1),
                                    is_top1=torch.zeros(rows, 1, dtype=torch.bool))

    def model(**kwargs):
        assert kwargs["fused_lm_head"] is True
        return outputs

    def same(t):
        return t  # one process: gather is the identity

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=chosen.device, gather=same, gather_for_metrics=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type), beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    trainer._compute_loss = types.MethodType(DPOTrainer._compute_loss, trainer)  # compute_loss calls it
    inputs = {"input_ids": torch.zeros(rows, 2, dtype=torch.long),
              "attention_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]]).expand(rows, 2),  # prompt token, completion token
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer.compute_loss(trainer, model, inputs)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss, metrics, chosen.grad, rejected.grad


@pytest.mark.parametrize("batch", (1, 7, 97))
def test_matches_trl_sigmoid(batch, generator):
    """label_smoothing = 0: TRL's ``loss_type="sigmoid"`` loss, gradients and metrics."""
    pairs = make_pairs(batch, torch.float32, generator)
    beta = 0.05 + 0.45 * torch.rand((), generator=generator).item()
    loss, stats, grad_chosen, grad_rejected, _ = run_op(pairs, beta=beta)
    want, metrics, want_chosen, want_rejected = trl_loss(pairs, beta=beta, loss_type=["sigmoid"])
    # the same float32 operations in the same order as TRL: equal to rounding
    torch.testing.assert_close(loss, want, rtol=4 * U32, atol=0)
    torch.testing.assert_close(grad_chosen, want_chosen, rtol=4 * U32, atol=0)
    torch.testing.assert_close(grad_rejected, want_rejected, rtol=4 * U32, atol=0)
    for name in STAT_NAMES:
        assert stats[name] == pytest.approx(metrics[name], rel=4 * U32, abs=1e-30), name


@pytest.mark.parametrize("batch", (1, 7, 97))
def test_label_smoothing_matches_trl(batch, generator):
    """TRL 1.16's ``"sigmoid"`` ignores label_smoothing (cDPO left it in #3906); its
    ``"robust"`` branch holds the same two logσ terms, and
    cDPO = 2(1 − ε)·sigmoid − (1 − 2ε)·robust in TRL's own weighted mixture of losses."""
    pairs = make_pairs(batch, torch.float32, generator)
    beta, eps = 0.05 + 0.45 * torch.rand((), generator=generator).item(), 0.1
    loss, stats, grad_chosen, grad_rejected, _ = run_op(pairs, beta=beta, label_smoothing=eps)
    want, metrics, want_chosen, want_rejected = trl_loss(
        pairs, beta=beta, loss_type=["sigmoid", "robust"], loss_weights=[2 * (1 - eps), -(1 - 2 * eps)],
        label_smoothing=eps)
    # TRL's mixture cancels a (1 − ε)·logσ(β·h) between its two terms: budget on their size
    _, _, _, _, scale, grad_scale = reference(*pairs, beta=beta, label_smoothing=eps)
    assert abs(loss.item() - want.item()) <= 16 * U32 * 2 * scale.mean().item()
    for got, ref in ((grad_chosen, want_chosen), (grad_rejected, want_rejected)):
        assert bool(((got - ref).abs() <= 16 * U32 * 2 * grad_scale.float()).all())
    for name in STAT_NAMES:
        assert stats[name] == pytest.approx(metrics[name], rel=4 * U32, abs=1e-30), name

    # and TRL 1.16's plain "sigmoid" with label_smoothing = ε is still the ε = 0 loss
    ignored = trl_loss(pairs, beta=beta, loss_type=["sigmoid"], label_smoothing=eps)[0]
    unsmoothed = dpo_loss(*pairs, beta=beta)[0]
    torch.testing.assert_close(ignored.detach(), unsmoothed, rtol=4 * U32, atol=0)
