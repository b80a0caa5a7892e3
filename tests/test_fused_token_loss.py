"""The three-GEMM token-local loss (``livethinking.ops.fused_token_loss``): value and
gradients against float64 autograd through materialised logits, over chunk sizes, masks,
dtypes, bias, temperature and upstream scales; and ``fused_linear_grpo_loss`` taking it
(token importance ratios) with the same result as the four-GEMM path."""

import pytest
import torch
import torch.nn.functional as F

from livethinking.ops import fused_linear_grpo_loss
from livethinking.ops import grpo as grpo_module
from livethinking.ops.fused_token_loss import fused_linear_token_loss

U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8}


def _token_loss(weights):
    """A nonlinear token-local loss Σ_n w_n (sin(logp_n) + ½ logp_n²) over (N,) log-probs."""
    return lambda logp: (weights * (torch.sin(logp) + 0.5 * logp**2)).sum()


def _case(generator, rows, hidden, vocab, dtype, masked=(), with_bias=False):
    h = (torch.randn(rows, hidden, generator=generator)).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, generator=generator)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(vocab, generator=generator)).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    mask = torch.ones(rows, dtype=torch.bool)
    mask[list(masked)] = False
    weights = torch.randn(rows, generator=generator, dtype=torch.float64) * mask
    return h, w, b, targets, mask, weights


def _reference(h, w, b, targets, mask, weights, temperature, scale):
    """float64 autograd through the full (N, V) logits; masked rows' logp forced to 0."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    logits = h64 @ w64.T + (0 if b64 is None else b64)
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(1, targets[:, None])[:, 0] * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    loss = _token_loss(weights)(logp)
    grads = torch.autograd.grad(scale * loss, [t for t in (h64, w64, b64) if t is not None])
    return loss.detach(), logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias,temperature,scale", [(False, 1.0, 1.0), (True, 0.7, 2.5)])
def test_matches_float64_autograd(chunk_rows, dtype, with_bias, temperature, scale, generator):
    rows, hidden, vocab = 13, 9, 97
    h, w, b, targets, mask, weights = _case(generator, rows, hidden, vocab, dtype, masked=(2, 3, 11),
                                            with_bias=with_bias)
    loss, logp, entropy = fused_linear_token_loss(h, w, targets, _token_loss(weights.float()
                                                  if dtype != torch.float64 else weights),
                                                  bias=b, temperature=temperature, row_mask=mask,
                                                  chunk_rows=chunk_rows)
    inputs = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(scale * loss, inputs)
    want_loss, want_logp, want_entropy, want_grads = _reference(h, w, b, targets, mask, weights,
                                                                temperature, scale)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == logp.dtype == entropy.dtype == compute
    assert not logp.requires_grad and not entropy.requires_grad
    assert torch.equal(logp[~mask], torch.zeros(3, dtype=compute))  # masked rows: exactly 0
    # budget: the inputs' own rounding (bf16 inputs are exact in fp32 compute) plus
    # fp32/fp64 sums over V and H terms
    u = U[torch.float64] if dtype == torch.float64 else U[torch.float32]
    budget = 64 * (vocab + hidden) * u
    scale_of = lambda t: t.abs().max().item() + 1.0  # noqa: E731
    assert (logp.double() - want_logp).abs().max() <= budget * scale_of(want_logp)
    assert (entropy.double() - want_entropy).abs().max() <= budget * scale_of(want_entropy)
    assert abs(loss.double() - want_loss) <= budget * (weights.abs().sum().item() + 1) * scale_of(want_logp)
    for got, want, source in zip(grads, want_grads, inputs):
        assert got.dtype == source.dtype and got.shape == source.shape
        tolerance = budget * scale_of(want) * scale_of(want_logp)
        if dtype == torch.bfloat16:  # the gradient is rounded once to bf16 on return
            tolerance += 2 * U[torch.bfloat16] * scale_of(want)
        assert (got.double() - want).abs().max() <= tolerance


def test_masked_rows_get_no_gradient_and_all_masked_is_zero(generator):
    h, w, _, targets, mask, weights = _case(generator, 6, 5, 11, torch.float64, masked=(0, 4))
    loss, _, _ = fused_linear_token_loss(h, w, targets, _token_loss(weights), row_mask=mask, chunk_rows=2)
    grad_h, = torch.autograd.grad(loss, [h])
    assert torch.equal(grad_h[~mask], torch.zeros(2, 5, dtype=torch.float64))
    none = torch.zeros(6, dtype=torch.bool)
    loss, logp, _ = fused_linear_token_loss(h, w, targets, _token_loss(weights), row_mask=none)
    grad_h, grad_w = torch.autograd.grad(loss, [h, w])
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any() and not logp.any()


def test_only_the_weight_wants_a_gradient(generator):
    h, w, _, targets, mask, weights = _case(generator, 8, 6, 17, torch.float64)
    h = h.detach()
    loss, _, _ = fused_linear_token_loss(h, w, targets, _token_loss(weights), row_mask=mask, chunk_rows=3)
    grad_w, = torch.autograd.grad(loss, [w])
    *_, want = _reference(h, w, None, targets, mask, weights, 1.0, 1.0)
    assert torch.allclose(grad_w, want[1], rtol=0, atol=1e-12)


# ------------------------------------------------------------- through fused_linear_grpo_loss
def _grpo_case(generator, batch=3, length=7, hidden=8, vocab=53, dtype=torch.float64):
    h = torch.randn(batch, length, hidden, generator=generator, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, generator=generator, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = (torch.rand(batch, length, generator=generator) < 0.75).long()
    mask[1] = 0  # an all-masked row
    adv = torch.randn(batch, generator=generator, dtype=dtype)
    with torch.no_grad():
        logp = F.log_softmax(h @ w.T, -1).gather(-1, targets[..., None])[..., 0]
    old = (logp + 0.3 * torch.randn(batch, length, generator=generator, dtype=dtype)).float()
    ref = (logp + 0.2 * torch.randn(batch, length, generator=generator, dtype=dtype)).float()
    return h, w, targets, mask, adv, old, ref


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_takes_the_three_gemm_path_with_the_four_gemm_result(loss_type, beta, generator,
                                                                      monkeypatch):
    h, w, targets, mask, adv, old, ref = _grpo_case(generator)
    kwargs = dict(old_logprobs=old, ref_logprobs=ref, beta=beta, loss_type=loss_type,
                  epsilon_high=0.28, temperature=0.9)
    taken = []
    real = grpo_module.fused_linear_token_loss
    monkeypatch.setattr(grpo_module, "fused_linear_token_loss",
                        lambda *a, **k: taken.append(1) or real(*a, **k, chunk_rows=4))
    loss, stats = fused_linear_grpo_loss(h, w, targets, mask, adv, **kwargs)
    grads = torch.autograd.grad(loss, [h, w])
    assert taken == [1]
    monkeypatch.setattr(grpo_module, "_gradient_in_forward", lambda *a: False)
    want_loss, want_stats = fused_linear_grpo_loss(h, w, targets, mask, adv, **kwargs)
    want_grads = torch.autograd.grad(want_loss, [h, w])
    assert torch.allclose(loss, want_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    for name, value in want_stats.items():
        assert torch.allclose(stats[name].double(), value.double(), rtol=1e-10, atol=1e-12), name


def test_grpo_loss_keeps_autograd_for_sequence_and_chunk_ratios(generator, monkeypatch):
    h, w, targets, mask, adv, old, _ = _grpo_case(generator)
    monkeypatch.setattr(grpo_module, "fused_linear_token_loss",
                        lambda *a, **k: pytest.fail("sequence ratios mix tokens: not token-local"))
    loss, _ = fused_linear_grpo_loss(h, w, targets, mask, adv, old_logprobs=old,
                                     importance_sampling_level="sequence")
    loss.backward()
    with torch.no_grad():  # no gradient wanted: the log-prob op alone
        fused_linear_grpo_loss(h, w, targets, mask, adv, old_logprobs=old)
