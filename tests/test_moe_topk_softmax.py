"""moe_topk_softmax against a float64 reference, over awkward sizes, dtypes and ties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from livethinking.ops import moe_topk_softmax
from livethinking.ops.reference import moe_topk_softmax_reference

U32 = 2.0**-24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def float64_weights(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Exact-enough weights for the chosen ids: softmax in float64 of the stored logits."""
    probs = torch.softmax(logits.double(), dim=-1).gather(1, ids.long())
    return probs / probs.sum(-1, keepdim=True) if renormalize else probs


def weight_budget(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Relative error budget per token of float32 softmax + top-k renormalisation.

    Rounding l - max costs u·|l - max| in the exponent, exp a few ulp, the sum over E
    terms (E - 1)·u, the renormalising sum and divisions (k + 2)·u.
    """
    values = logits.float()
    spread = values.max(-1).values - values.min(-1).values if values.numel() else values.sum(-1)
    return ((spread + values.shape[-1] + top_k + 8) * U32)[:, None]


def check_against_reference(logits, top_k, renormalize):
    weights, ids = moe_topk_softmax(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    _, ref_ids = moe_topk_softmax_reference(logits, top_k, renormalize)
    assert torch.equal(ids, ref_ids)
    expected = float64_weights(logits, ref_ids, renormalize)
    error = (weights.double() - expected).abs()
    # Probabilities under float32's normal range (2^-126) may underflow to 0 or a subnormal.
    bad = error > weight_budget(logits, top_k) * expected + 2.0**-126
    assert not bad.any(), (logits[bad.any(1)], weights[bad.any(1)], expected[bad.any(1)])
    if logits.shape[0]:
        # descending, and equal weights only for equal logits
        assert torch.all(weights[:, :-1] >= weights[:, 1:])


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 97, 1025])
@pytest.mark.parametrize("num_experts", [8, 60, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(num_tokens, num_experts, top_k, dtype, generator):
    logits = (torch.randn(num_tokens, num_experts, generator=generator) * 3).to(dtype)
    for renormalize in (True, False):
        check_against_reference(logits, top_k, renormalize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_lower_expert(dtype, generator):
    # Few distinct values: most rows hold ties across the top-k boundary.
    logits = torch.randint(-2, 3, (257, 60), generator=generator).to(dtype)
    check_against_reference(logits, 8, True)
    weights, ids = moe_topk_softmax(torch.zeros(3, 16, dtype=dtype), 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.all(weights == 0.25)


def test_extreme_logits_stay_finite(generator):
    logits = torch.randn(33, 128, generator=generator) * 1e4  # softmax saturates
    for renormalize in (True, False):
        weights, ids = moe_topk_softmax(logits, 8, renormalize)
        assert torch.isfinite(weights).all()
        assert torch.equal(ids, moe_topk_softmax_reference(logits, 8, renormalize)[1])


def test_non_contiguous_input(generator):
    logits = torch.randn(64, 40, generator=generator)[::2, :30]
    check_against_reference(logits, 4, True)


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_matches_float64_autograd(renormalize, generator):
    logits = torch.randn(37, 60, generator=generator) * 2
    upstream = torch.randn(37, 8, generator=generator)
    leaf = logits.clone().requires_grad_()
    weights, ids = moe_topk_softmax(leaf, 8, renormalize)
    (weights * upstream).sum().backward()

    leaf64 = logits.double().requires_grad_()
    probs = torch.softmax(leaf64, dim=-1).gather(1, ids.long())
    expected = probs / probs.sum(-1, keepdim=True) if renormalize else probs
    (expected * upstream.double()).sum().backward()
    budget = 4 * (60 + 8 + 16) * U32 * upstream.abs().max()
    assert (leaf.grad.double() - leaf64.grad).abs().max() <= budget


def test_gradient_of_half_precision_logits(generator):
    # Half-precision logits convert to float32 exactly, so their gradient is the float32
    # gradient rounded once to the logits' dtype.
    logits = torch.randn(5, 16, generator=generator)
    upstream = torch.randn(5, 2, generator=generator)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype).requires_grad_()
        high = logits.to(dtype).float().requires_grad_()
        (moe_topk_softmax(low, 2)[0] * upstream).sum().backward()
        (moe_topk_softmax(high, 2)[0] * upstream).sum().backward()
        assert low.grad.dtype == dtype
        assert torch.equal(low.grad, high.grad.to(dtype))


@given(num_tokens=st.integers(0, 70), num_experts=st.integers(1, 200),
       data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(num_tokens, num_experts, data, seed):
    top_k = data.draw(st.integers(1, num_experts), label="top_k")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    renormalize = data.draw(st.booleans(), label="renormalize")
    scale = data.draw(st.sampled_from([0.01, 1.0, 30.0]), label="scale")
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * scale).to(dtype)
    check_against_reference(logits, top_k, renormalize)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, generator):
    logits = torch.randn(9, 24, generator=generator, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.livethinking.moe_topk_softmax.default, (logits, 3, True))
    torch.library.opcheck(torch.ops.livethinking.moe_topk_softmax.default, (logits, 3, False))

