"""fused_linear_grpo_loss and group_advantages against references that materialise logits."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # CI installs it (README)

from livethinking.ops import fused_linear_grpo_loss, fused_linear_logprobs, group_advantages

U32 = 2.0**-24
STATS = ["entropy", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio"]


def reference_loss(hidden, weight, targets, mask, advantages, *, old=None, ref=None, bias=None,
                   temperature=1.0, beta=0.0, epsilon_low=0.2, epsilon_high=None, delta=None,
                   loss_type="dapo", level="token", max_completion_length=None,
                   num_items_in_batch=None, kl_estimator="k3", is_weights=None, dtype=torch.float64):
    """The loss written sequence by sequence, with full logits in ``dtype``."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    log_probs = F.log_softmax(logits / temperature, dim=-1)  # (B, T, V)
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    batch, length = targets.shape
    per_sequence, token_sums, counts, stats = [], [], [], {k: [] for k in STATS}
    abs_sequence, abs_sums = [], []  # the same sums of |loss_t|: the scale of the cancellation
    for b in range(batch):
        m = mask[b].to(dtype)
        a = advantages[b].to(dtype) if advantages.dim() == 1 else advantages[b].to(dtype)
        old_b = logp[b].detach() if old is None else old[b].to(dtype)
        log_ratio = logp[b] - old_b
        if level == "sequence":
            log_ratio = ((log_ratio * m).sum() / m.sum().clamp(min=1)).expand(length)
        ratio = log_ratio.exp()
        if loss_type == "cispo":
            loss_t = -ratio.clamp(max=1 + eps_high).detach() * a * logp[b]
        else:
            first = ratio if delta is None else ratio.clamp(max=delta)
            loss_t = -torch.minimum(first * a, ratio.clamp(1 - epsilon_low, 1 + eps_high) * a)
        if is_weights is not None:
            loss_t = loss_t * is_weights[b].to(dtype)
        kl_t = torch.zeros_like(loss_t)
        if ref is not None:
            d = ref[b].to(dtype) - logp[b]
            kl_t = {"k1": -d, "k2": 0.5 * d * d, "k3": d.exp() - d - 1}[kl_estimator]
            if beta > 0:
                loss_t = loss_t + beta * kl_t
        token_sums.append((loss_t * m).sum())
        counts.append(m.sum())
        per_sequence.append(token_sums[-1] / m.sum().clamp(min=1))
        abs_sums.append((loss_t.detach().abs() * m).sum())
        abs_sequence.append(abs_sums[-1] / m.sum().clamp(min=1))
        low = ((ratio < 1 - epsilon_low) & (a < 0) & (loss_type != "cispo")).to(dtype)
        high = ((ratio > 1 + eps_high) & (a > 0)).to(dtype)
        for name, value in zip(STATS, [entropy[b], kl_t, low, high, torch.maximum(low, high), ratio]):
            stats[name].append((value.detach() * m).sum())
    tokens = torch.stack(counts).sum()

    def aggregate(sums, sequences):
        if loss_type == "grpo":
            return torch.stack(sequences).mean()
        total = torch.stack(sums).sum()
        if loss_type == "bnpo":
            return total / tokens.clamp(min=1)
        if loss_type == "dr_grpo":
            return total / (batch * (max_completion_length or length))
        return total / (tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)

    loss = aggregate(token_sums, per_sequence)
    stats = {k: torch.stack(v).sum() / tokens.clamp(min=1) for k, v in stats.items()}
    stats["logprobs"] = logp.detach()
    stats["magnitude"] = aggregate(abs_sums, abs_sequence)
    return loss, stats


def make_batch(generator, batch=3, length=5, hidden_size=16, vocab=997, all_masked_row=True):
    hidden = torch.randn(batch, length, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.rand(batch, length, generator=generator) < 0.8
    mask[0, 0] = True
    if all_masked_row:
        mask[-1] = False
    advantages = torch.randn(batch, generator=generator)
    return hidden, weight, targets, mask, advantages


def run(loss_fn, inputs, kwargs):
    hidden, weight, targets, mask, advantages = inputs
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    bias = kwargs.pop("bias", None)
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    loss, stats = loss_fn(leaves[0], leaves[1], targets, mask, advantages, bias=leaves[2] if bias is not None else None, **kwargs)
    loss.backward()
    return loss.detach(), stats, [leaf.grad for leaf in leaves]


CASES = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo", "cispo"], ["token", "sequence"],
                               [False, True], [None, "k1", "k2", "k3"], [1.0, 0.7]))


@pytest.mark.parametrize("loss_type,level,with_old,kl,temperature", CASES)
def test_matches_float64_reference(loss_type, level, with_old, kl, temperature, generator):
    inputs = make_batch(generator)
    hidden, weight, targets, mask, advantages = inputs
    kwargs = dict(temperature=temperature, epsilon_low=0.2, epsilon_high=0.28)
    if with_old:  # an off-policy batch: old log-probs near the current ones, ratios clip
        exact = reference_loss(*inputs, temperature=temperature)[1]["logprobs"]
        kwargs["old_logprobs"] = (exact + 0.3 * torch.randn(exact.shape, generator=generator)).float()
        kwargs["rollout_is_weights"] = torch.rand(targets.shape, generator=generator) + 0.5
        kwargs["delta"] = 1.5
    if kl is not None:
        kwargs.update(beta=0.05, kl_estimator=kl,
                      ref_logprobs=(reference_loss(*inputs, temperature=temperature)[1]["logprobs"]
                                    + 0.2 * torch.randn(targets.shape, generator=generator)).float())
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 8
    if loss_type == "dapo":
        kwargs["num_items_in_batch"] = 11.0
    if loss_type == "bnpo":
        kwargs["bias"] = torch.randn(weight.shape[0], generator=generator)

    reference_kwargs = dict(kwargs)
    renames = {"old_logprobs": "old", "ref_logprobs": "ref", "importance_sampling_level": "level",
               "rollout_is_weights": "is_weights"}
    reference_kwargs = {renames.get(k, k): v for k, v in reference_kwargs.items()}
    reference_kwargs.update(loss_type=loss_type, level=level)

    def reference(dtype):
        converted = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
        if "bias" in reference_kwargs:
            reference_kwargs["bias"] = reference_kwargs["bias"].to(dtype)
        return run(lambda *a, **k: reference_loss(*a, **k, dtype=dtype), converted,
                   dict(reference_kwargs))

    exact, plain = reference(torch.float64), reference(torch.float32)
    ours = run(fused_linear_grpo_loss, inputs,
               dict(kwargs, loss_type=loss_type, importance_sampling_level=level))
    # the loss sums signed terms: its rounding scale is the same sum of their magnitudes
    scale = max(exact[1]["magnitude"].item(), 1e-3)
    # loss and gradients: within 2x plain fp32's error, plus a few fp32 ulps of their scale
    for name, o, p, e in [("loss", ours[0], plain[0], exact[0])] + [
            (f"grad {i}", o, p, e) for i, (o, p, e) in enumerate(zip(ours[2], plain[2], exact[2]))]:
        floor = 64 * U32 * max(e.abs().max().item(), scale)
        error = (o.double() - e).abs().max().item()
        assert error <= 2 * (p.double() - e).abs().max().item() + floor, (name, error)
    for name in STATS:
        assert abs(ours[1][name].item() - exact[1][name].item()) <= 1e-4 * max(1, abs(exact[1][name].item())), name
    # masked tokens cost no GEMM work: their log-probs read 0
    assert torch.allclose(ours[1]["logprobs"].double(), exact[1]["logprobs"] * mask, atol=1e-4)
    assert ours[1]["logprobs"].dtype == torch.float32 and not ours[1]["logprobs"].requires_grad


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage(generator):
    hidden, weight, targets, mask, advantages = make_batch(generator, all_masked_row=False)
    loss, stats = fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, loss_type="bnpo")
    expected = -(advantages[:, None] * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["clip_ratio_region"].item() == 0.0


def test_all_masked_batch_gives_zero_loss_and_zero_gradients(generator):
    hidden, weight, targets, mask, advantages = make_batch(generator)
    mask[:] = False
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"):
        loss, stats = fused_linear_grpo_loss(h, w, targets, mask, advantages, loss_type=loss_type)
        loss.backward()
        assert loss.item() == 0.0 and stats["entropy"].item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_single_token_and_per_token_advantages(generator):
    hidden, weight, targets, mask, _ = make_batch(generator, batch=1, length=1, all_masked_row=False)
    advantages = torch.randn(1, 1, generator=generator)
    ours = run(fused_linear_grpo_loss, (hidden, weight, targets, mask, advantages), {"loss_type": "grpo"})
    exact = run(lambda *a, **k: reference_loss(*a, **k, loss_type="grpo"),
                (hidden.double(), weight.double(), targets, mask, advantages), {})
    assert torch.allclose(ours[0].double(), exact[0], atol=1e-6)
    for o, e in zip(ours[2], exact[2]):
        assert torch.allclose(o.double(), e, atol=1e-5)


def test_chunked_logprobs_gradcheck_float64(generator):
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 13, (5,), generator=generator)
    mask = torch.tensor([True, True, False, True, True])

    def both(h, w, b):
        return fused_linear_logprobs(h, w, targets, bias=b, temperature=0.8, return_entropy=True,
                                     row_mask=mask, chunk_rows=2)

    assert torch.autograd.gradcheck(both, (hidden, weight, bias))


PEAK_SCRIPT = """
import sys, torch
from livethinking.ops import fused_linear_logprobs
rows, vocab, naive = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "naive"
torch.manual_seed(0)
def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024
def step(n):
    weight = torch.randn(vocab, 64, requires_grad=True)
    hidden = torch.randn(n, 64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    if naive:
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    else:
        logp = fused_linear_logprobs(hidden, weight, targets)
    logp.sum().backward()
step(8)  # load every code path first
before = rss("VmRSS:")
step(rows)
print(rss("VmHWM:") - before)
"""


def peak_extra_bytes(rows, vocab, mode):
    import os
    import subprocess
    import sys

    # glibc returns every block of >= 128 KiB to the system when freed (no heap caching),
    # so resident memory follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(rows), str(vocab), mode],
                            capture_output=True, text=True, timeout=300, check=True, env=env)
    return int(result.stdout.strip().splitlines()[-1])


def test_chunked_peak_memory_is_flat_in_rows_and_far_below_naive():
    """Peak RSS growth of one forward+backward (fresh process each): the CPU path keeps one
    chunk of fp32 logits alive, the naive path all N x V of them."""
    small, large = peak_extra_bytes(512, 32000, "chunked"), peak_extra_bytes(4096, 32000, "chunked")
    naive = peak_extra_bytes(4096, 32000, "naive")
    assert large <= small + (8 << 20), (small, large)  # flat in N (hidden and its gradient aside)
    assert naive >= 10 * large, (naive, large)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages(scale, aggregation, generator):
    rewards = torch.rand(12, 3, generator=generator)
    weights = torch.tensor([1.0, 0.5, 2.0])
    out = group_advantages(rewards, 4, reward_weights=weights, scale=scale, aggregation=aggregation)
    expected = []
    components = [(rewards * weights).sum(1, keepdim=True)] if aggregation == "sum_then_normalize" \
        else [rewards[:, c:c + 1] for c in range(3)]
    for c, values in enumerate(components):
        normalised = torch.empty(12)
        for g in range(3):
            group = values[4 * g: 4 * g + 4, 0]
            std = {"group": group.std(), "batch": values[:, 0].std(), "none": None}[scale]
            centred = group - group.mean()
            normalised[4 * g: 4 * g + 4] = centred if std is None else centred / (std + 1e-4)
        expected.append(normalised * (1.0 if aggregation == "sum_then_normalize" else weights[c]))
    assert torch.allclose(out, torch.stack(expected).sum(0), atol=1e-5)
    assert out.shape == (12,)


def test_group_advantages_of_equal_rewards_are_zero():
    assert torch.equal(group_advantages(torch.ones(8), 4), torch.zeros(8))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(importance_sampling_level="chunk"), ValueError, "importance_sampling_level"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(old_logprobs=torch.zeros(2, 5)), ValueError, r"old_logprobs must have shape \(3, 5\)"),
])
def test_bad_input(kwargs, error, message, generator):
    hidden, weight, targets, mask, advantages = make_batch(generator)
    with pytest.raises(error, match=message):
        fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, **kwargs)


def test_bad_targets_and_shapes(generator):
    hidden, weight, targets, mask, advantages = make_batch(generator)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=997\)"):
        fused_linear_grpo_loss(hidden, weight, targets + 997, mask, advantages)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 16\)"):
        fused_linear_grpo_loss(hidden, weight[:, :7], targets, mask, advantages)
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\) or \(3, 5\)"):
        fused_linear_grpo_loss(hidden, weight, targets, mask, advantages[:2])
    with pytest.raises(ValueError, match="group_size must be a positive int dividing B = 6"):
        group_advantages(torch.zeros(6), 4)


LIGER_CASES = [case for case in itertools.product(
    ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"], ["token", "sequence"], [False, True],
    ["none", "logprobs", "model"]) if not (case[0] == "cispo" and case[1] == "sequence")]


@pytest.mark.parametrize("loss_type,level,off_policy,ref", LIGER_CASES)
def test_matches_liger(loss_type, level, off_policy, ref, generator):
    """Against Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` (an outside implementation of
    TRL's GRPOTrainer loss), fp32, loss + d hidden + d weight + d bias + its two metrics.

    Same semantics, so compared directly: the grpo/bnpo/dr_grpo/dapo aggregation
    (``num_items_in_batch`` and ``max_completion_length`` too), old log-probs, the token and
    sequence (GSPO: masked mean of the log-ratio) importance ratio, two-sided clipping with
    ``delta`` (Liger clamps the unclipped ratio at ``delta`` as we do), rollout importance
    weights (Liger's ``vllm_is_ratio``, applied before the KL term as ours), β·k3 KL against
    reference log-probs given directly or computed by Liger from a reference model
    (``ref_input``/``ref_weight``; ours gets ``fused_linear_logprobs`` of the same), temperature
    and an lm-head bias; Liger's metrics are [KL (when β ≠ 0), the clipped-region fraction],
    ours ``kl`` and ``clip_ratio_region``.
    Different by design, so mapped: CISPO caps the detached ratio at ``1 + epsilon_high`` in
    ours (the paper's form) and at ``epsilon_high`` in Liger/TRL: Liger gets ``1 + ε_high``.
    Liger's CISPO clip metric counts only the upper cap (as TRL's ``cispo_clip_ratio``), as
    our ``clip_ratio_region`` does for CISPO.
    Not compared: Liger refuses CISPO with sequence-level ratios; it has no k1/k2 KL and no
    per-token advantages; its float64 inputs are computed through float32 log-probs (its loss
    is float32), so fp64 is no sharper reference than fp32 and only fp32 is compared.
    Error budget: 4x what plain fp32 (full logits) makes against fp64, plus a few fp32 ulps of
    the loss's magnitude — no implementation-specific slack."""
    inputs = make_batch(generator)
    hidden, weight, targets, mask, advantages = inputs
    bias = torch.randn(weight.shape[0], generator=generator)
    temperature, beta = 0.7, (0.0 if ref == "none" else 0.05)
    exact_logp = reference_loss(*inputs, bias=bias, temperature=temperature)[1]["logprobs"].float()
    ours_kwargs = dict(temperature=temperature, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                       loss_type=loss_type, importance_sampling_level=level)
    liger_kwargs = dict(temperature=temperature, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                        loss_type=loss_type, importance_sampling_level=level, compiled=False,
                        use_ref_model=ref != "none")
    call = {}
    if loss_type == "cispo":
        liger_kwargs["epsilon_high"] = 1 + 0.28
    if loss_type == "dr_grpo":
        ours_kwargs["max_completion_length"] = liger_kwargs["max_completion_length"] = 8
    if loss_type == "dapo":
        ours_kwargs["num_items_in_batch"] = call["num_items_in_batch"] = 11.0
    if off_policy:  # old log-probs off by ±0.45 a sequence (toward clipping) ± 0.3 a token;
        # the token noise has mean 0 over each row's masked tokens, so every sequence-level
        # ratio is e^(±0.45), outside [0.8, 1.28]: the case clips whatever the seed
        noise = torch.randn(exact_logp.shape, generator=generator)
        noise -= ((noise * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
        old = exact_logp - 0.45 * advantages.sign()[:, None] + 0.3 * noise
        is_weights = torch.rand(targets.shape, generator=generator) + 0.5
        ours_kwargs.update(old_logprobs=old, rollout_is_weights=is_weights, delta=1.5)
        call.update(old_per_token_logps=old, vllm_is_ratio=is_weights)
        liger_kwargs["delta"] = 1.5
    if ref == "logprobs":
        ref_logp = exact_logp + 0.2 * torch.randn(exact_logp.shape, generator=generator)
        ours_kwargs["ref_logprobs"] = call["ref_per_token_logps"] = ref_logp
    elif ref == "model":  # a reference model: its own final hidden states and lm head
        ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=generator)
        ref_weight = weight + 0.05 * torch.randn(weight.shape, generator=generator)
        ours_kwargs["ref_logprobs"] = fused_linear_logprobs(
            ref_hidden.reshape(-1, hidden.shape[-1]), ref_weight, targets.reshape(-1), bias=bias,
            temperature=temperature).reshape(targets.shape)
        call.update(ref_input=ref_hidden, ref_weight=ref_weight, ref_bias=bias)

    reference_kwargs = {"old": ours_kwargs.get("old_logprobs"), "ref": ours_kwargs.get("ref_logprobs"),
                        "is_weights": ours_kwargs.get("rollout_is_weights"), "level": level,
                        **{k: v for k, v in ours_kwargs.items() if k in (
                            "temperature", "epsilon_low", "epsilon_high", "beta", "loss_type",
                            "delta", "max_completion_length", "num_items_in_batch")}}
    exact = run(lambda *a, **k: reference_loss(*a, **k, dtype=torch.float64),
                [t.double() if t.is_floating_point() else t for t in inputs],
                dict(reference_kwargs, bias=bias.double()))
    plain = run(lambda *a, **k: reference_loss(*a, **k, dtype=torch.float32), inputs,
                dict(reference_kwargs, bias=bias))
    ours = run(fused_linear_grpo_loss, inputs, dict(ours_kwargs, bias=bias))

    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
              bias.clone().requires_grad_()]
    module = LigerFusedLinearGRPOLoss(**liger_kwargs)
    liger_loss, liger_metrics = module(leaves[0], leaves[1], targets, mask.float(), advantages,
                                       bias=leaves[2], **call)
    liger_loss.backward()

    scale = max(exact[1]["magnitude"].item(), 1e-3)
    for name, o, t, p, e in [("loss", ours[0], liger_loss.detach(), plain[0], exact[0])] + [
            (f"grad {i}", o, leaf.grad, p, e)
            for i, (o, leaf, p, e) in enumerate(zip(ours[2], leaves, plain[2], exact[2]))]:
        budget = 4 * (p.double() - e).abs().max().item() + 64 * U32 * max(e.abs().max().item(), scale)
        difference = (o.double() - t.double()).abs().max().item()
        assert difference <= budget, (name, difference, budget)
    *liger_kl, liger_clipped = liger_metrics
    assert len(liger_kl) == (beta != 0)
    if liger_kl:
        assert ours[1]["kl"].item() == pytest.approx(liger_kl[0].item(), rel=1e-5, abs=1e-7)
    # CISPO clips only above (Liger and TRL count ``ratio > cap and A > 0``), so for it our
    # clip_ratio_low is 0 and the region is the high count, as for the other types
    assert ours[1]["clip_ratio_region"].item() == pytest.approx(liger_clipped.item(), abs=1e-7)
    if loss_type == "cispo":
        assert ours[1]["clip_ratio_low"].item() == 0.0
    if off_policy and loss_type != "cispo":
        assert liger_clipped.item() > 0  # the case exercises clipping


def test_reference_logprobs_without_beta_only_feed_the_kl_statistic(generator):
    hidden, weight, targets, mask, advantages = make_batch(generator)
    ref = torch.randn(targets.shape, generator=generator) - 7
    plain, plain_stats = fused_linear_grpo_loss(hidden, weight, targets, mask, advantages)
    with_ref, stats = fused_linear_grpo_loss(hidden, weight, targets, mask, advantages,
                                             ref_logprobs=ref)
    assert torch.equal(plain, with_ref)
    assert plain_stats["kl"].item() == 0.0 and stats["kl"].item() > 0.0
    expected = reference_loss(hidden.double(), weight.double(), targets, mask, advantages,
                              ref=ref)[1]["kl"]
    assert stats["kl"].item() == pytest.approx(expected.item(), rel=1e-4)
