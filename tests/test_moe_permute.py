"""moe_permute / moe_unpermute: values against float64, gradients by gradcheck and budgets."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from livethinking.ops import moe_align, moe_permute, moe_topk_softmax, moe_unpermute
from livethinking.ops.reference import moe_permute_reference, moe_unpermute_reference

EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11,
       torch.bfloat16: 2.0**-8}
# Half the smallest subnormal: the absolute error of rounding a result that underflows.
UNDERFLOW = {torch.float32: 2.0**-150, torch.float64: 0.0, torch.float16: 2.0**-25,
             torch.bfloat16: 2.0**-134}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def routed(num_tokens, num_experts, top_k, block_size, generator, hidden=24, dtype=torch.float32):
    """Inputs of a routed layer: x (T, H), renormalised top-k weights, their alignment."""
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 2
    logits[:, num_experts // 2:] -= 100  # half the experts receive no token
    weights, ids = moe_topk_softmax(logits, top_k)
    alignment = moe_align(ids, num_experts, block_size)
    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    return x, weights, alignment


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_within(actual, exact, magnitude, dtype, terms):
    """|actual - exact| <= u_dtype |exact| + (terms + 1) u_acc magnitude (+ underflow),
    elementwise: one rounding to the storage dtype after a sum of ``terms`` products in
    the accumulation dtype (magnitude = sum of |products|)."""
    acc = accumulation_dtype(dtype)
    budget = (EPS[dtype] * exact.abs() + (terms + 1) * EPS[acc] * magnitude
              + UNDERFLOW[dtype] + 2 * terms * UNDERFLOW[acc])
    error = (actual.double() - exact).abs()
    assert torch.all(error <= budget), (error / budget).max()


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 97, 1025])
@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 8), (60, 2), (128, 8)])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_permute_and_unpermute_match_float64(num_tokens, num_experts, top_k, block_size,
                                             generator):
    x, weights, alignment = routed(num_tokens, num_experts, top_k, block_size, generator,
                                   hidden=7 if num_tokens > 100 else 33)
    sorted_ids = alignment.sorted_ids
    for dtype in DTYPES:
        xd = x.to(dtype)
        rows = moe_permute(xd, alignment)
        assert rows.dtype == dtype and rows.shape == (sorted_ids.numel(), x.shape[1])
        assert torch.equal(rows, moe_permute_reference(xd, sorted_ids, top_k))
        scaled = moe_permute(xd, alignment, weights)
        exact = moe_permute_reference(xd.double(), sorted_ids, top_k, weights.double())
        assert_within(scaled, exact, exact.abs(), dtype, terms=1)

        y = torch.randn(rows.shape, generator=generator).to(dtype)
        for w in (None, weights):
            out = moe_unpermute(y, alignment, w)
            assert out.dtype == dtype and out.shape == x.shape
            exact = moe_unpermute_reference(y.double(), alignment.row_of_pair,
                                            None if w is None else w.double())
            magnitude = moe_unpermute_reference(y.double().abs(), alignment.row_of_pair,
                                                None if w is None else w.double().abs())
            assert_within(out, exact, magnitude, dtype, terms=top_k)


def test_padding_rows_are_zero(generator):
    x, weights, alignment = routed(5, 16, 2, 64, generator)
    x = x + 10  # nowhere zero
    rows = moe_permute(x, alignment, weights)
    padding = alignment.sorted_ids == alignment.sentinel
    assert padding.sum() > 0
    assert torch.all(rows[padding] == 0) and torch.all(rows[~padding] != 0)


def test_round_trip_with_renormalised_weights(generator):
    # unpermute(permute(x), w) = sum_j w_j x = x when the k weights sum to one
    x, weights, alignment = routed(97, 60, 8, 16, generator, dtype=torch.float64)
    weights = weights.double() / weights.double().sum(-1, keepdim=True)  # sum to 1 in float64
    back = moe_unpermute(moe_permute(x, alignment), alignment, weights)
    assert torch.allclose(back, x, rtol=16 * EPS[torch.float64], atol=0)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_tokens,top_k", [(1, 1), (7, 2), (13, 8)])
def test_gradcheck_float64(num_tokens, top_k, block_size, generator):
    x, weights, alignment = routed(num_tokens, 16, top_k, block_size, generator, hidden=5,
                                   dtype=torch.float64)
    x.requires_grad_()
    w = weights.double().requires_grad_()
    y = torch.randn(alignment.sorted_ids.numel(), 5, dtype=torch.float64, generator=generator,
                    requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: moe_permute(x, alignment, w), (x, w))
    assert torch.autograd.gradcheck(lambda x: moe_permute(x, alignment), (x,))
    assert torch.autograd.gradcheck(lambda y, w: moe_unpermute(y, alignment, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: moe_unpermute(y, alignment), (y,))
    # a whole routed layer: permute, an elementwise "expert", combine
    assert torch.autograd.gradcheck(
        lambda x, w: moe_unpermute(torch.tanh(moe_permute(x, alignment)), alignment, w), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_in_low_precision_match_float64(dtype, generator):
    x, weights, alignment = routed(97, 60, 8, 16, generator, hidden=40, dtype=dtype)
    x.requires_grad_()
    w = weights.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=generator).to(dtype)
    moe_unpermute(torch.sin(moe_permute(x, alignment)), alignment, w).backward(upstream)

    x64 = x.detach().double().requires_grad_()
    w64 = weights.double().requires_grad_()
    rows = moe_permute_reference(x64, alignment.sorted_ids, 8)
    moe_unpermute_reference(torch.sin(rows), alignment.row_of_pair, w64).backward(upstream.double())
    # dx: 8 terms w·cos(x)·g rounded to dtype (sin's backward runs in dtype: 4 more roundings)
    scale = upstream.double().abs().max()
    assert (x.grad.double() - x64.grad).abs().max() <= (8 * EPS[dtype] + 8 * EPS[torch.float32]) * scale * 2
    # dw: a dot over 40 products, each input rounded to dtype once
    budget = (2 * EPS[dtype] + 41 * EPS[torch.float32]) * (upstream.double().abs().sum(1).max())
    assert (w.grad.double() - w64.grad).abs().max() <= budget
    assert w.grad.dtype == torch.float32 and x.grad.dtype == dtype


@given(num_tokens=st.integers(0, 60), num_experts=st.integers(1, 70), hidden=st.integers(0, 40),
       block_size=st.sampled_from([1, 4, 16, 64]), weighted=st.booleans(), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes(num_tokens, num_experts, hidden, block_size, weighted, data, seed):
    top_k = data.draw(st.integers(1, min(num_experts, 8)), label="top_k")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    gen = torch.Generator().manual_seed(seed)
    x, weights, alignment = routed(num_tokens, num_experts, top_k, block_size, gen, hidden, dtype)
    w = weights if weighted else None
    rows = moe_permute(x, alignment, w)
    exact = moe_permute_reference(x.double(), alignment.sorted_ids, top_k,
                                  None if w is None else w.double())
    assert_within(rows, exact, exact.abs(), dtype, terms=1)
    out = moe_unpermute(rows, alignment, w)
    exact = moe_unpermute_reference(rows.double(), alignment.row_of_pair,
                                    None if w is None else w.double())
    magnitude = moe_unpermute_reference(rows.double().abs(), alignment.row_of_pair,
                                        None if w is None else w.double().abs())
    assert_within(out, exact, magnitude, dtype, terms=top_k)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_tokens", [0, 9])
def test_opcheck(weighted, num_tokens, generator):
    x, weights, alignment = routed(num_tokens, 12, 3, 4, generator, hidden=6)
    x.requires_grad_()
    w = weights.requires_grad_() if weighted else None
    y = torch.randn(alignment.sorted_ids.numel(), 6, generator=generator, requires_grad=True)
    ops = torch.ops.livethinking
    torch.library.opcheck(ops.moe_permute.default,
                          (x, alignment.sorted_ids, alignment.row_of_pair, w))
    torch.library.opcheck(ops.moe_unpermute.default,
                          (y, alignment.sorted_ids, alignment.row_of_pair, w))
    torch.library.opcheck(ops.moe_pair_dot.default, (x.detach(), y.detach(), alignment.row_of_pair))
