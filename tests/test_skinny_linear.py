"""The C++ skinny GEMMs (``torch.ops.livethinking.skinny_linear`` / ``grouped_skinny_linear``)
and their wrappers ``livethinking.ops.linear`` against float64 products, within the
kernel's error bound (the engine's greedy decode through them against transformers' is
tests/test_engine.py's)."""

import pytest
import torch
import torch.nn.functional as F

from livethinking.ops.linear import grouped_linear, linear

U32 = 2.0**-24
MAX_SKINNY_ROWS = 64  # more rows go to at::mm


def _budget(x, w, rows_in_group):
    """The kernel's bound, (⌈K/8⌉ + 18) · u · Σ_k |x w| (header of skinny_gemm.h), per
    output; past 64 rows MKL's, bounded by the textbook γ_K: (K + 2) · u · Σ_k |x w|."""
    depth = x.shape[-1]
    factor = (-(-depth // 8) + 18) if rows_in_group <= MAX_SKINNY_ROWS else depth + 2
    return factor * U32 * (x.double().abs() @ w.double().abs().T)


def _check(out, x, w, rows_in_group):
    exact = x.double() @ w.double().T
    assert out.dtype == torch.float32 and out.shape == exact.shape and torch.isfinite(out).all()
    excess = (out.double() - exact).abs() - _budget(x, w, rows_in_group)
    assert excess.max().item() <= 0 if excess.numel() else True, excess.max().item()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 16, 33, 64, 65, 97])
@pytest.mark.parametrize("depth,cols", [(1, 7), (7, 1), (97, 50), (512, 25)])
def test_matches_float64_within_the_bound(rows, depth, cols, generator):
    x = torch.randn(rows, depth, generator=generator)
    w = torch.randn(cols, depth, generator=generator)
    _check(torch.ops.livethinking.skinny_linear(x, w), x, w, rows)


def test_strided_views_and_empty_shapes(generator):
    x = torch.randn(6, 40, generator=generator)[:, ::2]  # stride 2 along K: copied
    w = torch.randn(20, 9, generator=generator).T  # (9, 20) viewed transposed
    _check(torch.ops.livethinking.skinny_linear(x[:, :20], w), x[:, :20], w, 6)
    padded = torch.randn(5, 48, generator=generator)[:, :33]  # row stride 48 > K: read in place
    wide = torch.randn(11, 64, generator=generator)[:, :33]
    _check(torch.ops.livethinking.skinny_linear(padded, wide), padded, wide, 5)
    assert torch.ops.livethinking.skinny_linear(torch.randn(0, 8), torch.randn(3, 8)).shape == (0, 3)
    assert torch.ops.livethinking.skinny_linear(torch.randn(4, 8), torch.randn(0, 8)).shape == (4, 0)
    zero_depth = torch.ops.livethinking.skinny_linear(torch.randn(4, 0), torch.randn(3, 0))
    assert torch.equal(zero_depth, torch.zeros(4, 3))


@pytest.mark.parametrize("ends_dtype", [torch.int32, torch.int64])
def test_grouped_matches_float64_per_group(ends_dtype, generator):
    """Groups of 0 (first, middle, last), 1, 7, 64 and 97 rows (the last past the skinny
    kernel: MKL), each against its own weight."""
    counts = [0, 7, 1, 0, 64, 97, 3, 0]
    rows = torch.randn(sum(counts), 40, generator=generator)
    w = torch.randn(len(counts), 30, 40, generator=generator)
    ends = torch.tensor(counts).cumsum(0).to(ends_dtype)
    out = torch.ops.livethinking.grouped_skinny_linear(rows, w, ends)
    assert out.shape == (rows.shape[0], 30)
    start = 0
    for g, n in enumerate(counts):
        _check(out[start:start + n], rows[start:start + n], w[g], n)
        start += n
    assert torch.equal(grouped_linear(rows, w, ends), out)


def test_results_do_not_depend_on_the_thread_count(generator):
    x = torch.randn(13, 256, generator=generator)
    w = torch.randn(301, 256, generator=generator)
    experts = torch.randn(4, 301, 256, generator=generator)
    ends = torch.tensor([3, 3, 11, 13])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (torch.ops.livethinking.skinny_linear(x, w),
               torch.ops.livethinking.grouped_skinny_linear(x, experts, ends))
        torch.set_num_threads(2)
        two = (torch.ops.livethinking.skinny_linear(x, w),
               torch.ops.livethinking.grouped_skinny_linear(x, experts, ends))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.livethinking.skinny_linear(torch.randn(2, 4).double(), torch.randn(3, 4)),
     "x must be float32"),
    (lambda: torch.ops.livethinking.skinny_linear(torch.randn(2, 4), torch.randn(3, 5)),
     r"weight must be \(out_features, 4\)"),
    (lambda: torch.ops.livethinking.skinny_linear(torch.randn(2, 3, 4), torch.randn(3, 4)),
     r"x must be \(rows, in_features\)"),
    (lambda: torch.ops.livethinking.grouped_skinny_linear(torch.randn(5, 4), torch.randn(2, 3, 4),
                                                          torch.tensor([3, 2])),
     "ends must be non-decreasing"),
    (lambda: torch.ops.livethinking.grouped_skinny_linear(torch.randn(5, 4), torch.randn(2, 3, 4),
                                                          torch.tensor([2, 4])),
     "ends must end at rows' length 5"),
    (lambda: torch.ops.livethinking.grouped_skinny_linear(torch.randn(5, 4), torch.randn(2, 3, 4),
                                                          torch.tensor([5])),
     r"ends must be int32 or int64 of shape \(2,\)"),
    (lambda: torch.ops.livethinking.grouped_skinny_linear(torch.randn(5, 4), torch.randn(2, 3, 4),
                                                          torch.tensor([2.0, 5.0])),
     "ends must be int32 or int64"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrapper_takes_the_op_only_where_it_applies(generator):
    """``linear(fast=True)``: the op on (..., K) inputs with the bias added; autograd,
    float64 or ``fast=False``: ``F.linear`` itself (the trainer's numerics, bit for bit)."""
    x = torch.randn(2, 3, 24, generator=generator)
    w, b = torch.randn(10, 24, generator=generator), torch.randn(10, generator=generator)
    fast = linear(x, w, b, fast=True)
    assert torch.equal(fast, (torch.ops.livethinking.skinny_linear(x.reshape(6, 24), w) + b).reshape(2, 3, 10))
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear(x.double(), w.double(), fast=True), F.linear(x.double(), w.double()))
    leaf = w.clone().requires_grad_()
    out = linear(x, leaf, fast=True)  # wants a gradient: F.linear
    assert torch.equal(out, F.linear(x, leaf))
    out.sum().backward()
    assert torch.allclose(leaf.grad, x.reshape(6, 24).sum(0).expand(10, 24))
    assert grouped_linear(x[0].bfloat16(), w[None].bfloat16(), torch.tensor([3])) is None

