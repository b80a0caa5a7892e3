"""RMSNorm: the C++ CPU op the model runs without autograd, and torch's rms_norm with it,
against a float64 reference of transformers' formula (normalise in fp32, round to the
dtype, then multiply by the weight)."""

import pytest
import torch

from livethinking.model.layers import RMSNorm

EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
       torch.float64: 2.0**-53}


def _reference(x, weight, eps):
    """float64 of weight · round_dtype(x / sqrt(mean(x²) + eps)), the normalisation exact."""
    x64 = x.double()
    normed = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * normed.to(x.dtype).double()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 97), (4, 1, 128), (0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_op_matches_float64(shape, dtype, generator):
    x = (3 * torch.randn(shape, generator=generator)).to(dtype)
    weight = torch.randn(shape[-1], generator=generator).to(dtype)
    out = torch.ops.livethinking.rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    exact = _reference(x, weight, 1e-6)
    # relative: the fp32 (fp64) sum of D squares and the rsqrt, then one rounding of normed
    # to the dtype (the reference's own rounding of it may differ by an ulp) and one of
    # the product; near 0, the spacing of normed's subnormals times |w|
    acc = EPS[torch.float64 if dtype == torch.float64 else torch.float32]
    spacing = torch.finfo(dtype).smallest_normal * EPS[dtype]  # of fp16's subnormals
    budget = (4 * EPS[dtype] + (shape[-1] + 8) * acc) * exact.abs() \
        + 4 * spacing * weight.double().abs()
    assert ((out.double() - exact).abs() <= budget).all()


def test_op_gives_the_torch_composite_within_the_sum_budget_and_ignores_threads(generator):
    x = torch.randn(64, 3, 96, generator=generator)
    weight = torch.randn(96, generator=generator)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        native = norm(x, fast=True)
    composite = weight * torch.nn.functional.rms_norm(x, (96,), eps=1e-5)
    assert torch.allclose(native, composite, rtol=(96 + 8) * EPS[torch.float32], atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.livethinking.rms_norm(x, weight, 1e-5)
        torch.set_num_threads(2)
        two = torch.ops.livethinking.rms_norm(x, weight, 1e-5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_module_takes_the_op_only_when_fast_and_without_a_gradient(generator, monkeypatch):
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(3, 8, generator=generator, requires_grad=True)
    calls = []
    real = torch.ops.livethinking.rms_norm
    monkeypatch.setattr(torch.ops.livethinking, "rms_norm",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    out = norm(x, fast=True)
    out.sum().backward()  # differentiable: torch's rms_norm
    assert calls == [] and x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        norm(x)  # the trainer's numerics (the engine's scoring pass)
        assert calls == []
        norm(x, fast=True)
    assert calls == [1]


@pytest.mark.parametrize("change,error,match", [
    (dict(weight=torch.ones(5)), RuntimeError, r"weight must be \(4,\)"),
    (dict(weight=torch.ones(4, dtype=torch.float64)), RuntimeError, "share a dtype"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
])
def test_op_bad_input(change, error, match):
    args = dict(x=torch.randn(2, 4), weight=torch.ones(4), eps=1e-6)
    args.update(change)
    with pytest.raises(error, match=match):
        torch.ops.livethinking.rms_norm(args["x"], args["weight"], args["eps"])


def test_op_opcheck(generator):
    x = torch.randn(3, 5, 12, generator=generator)
    torch.library.opcheck(torch.ops.livethinking.rms_norm.default, (x, torch.randn(12), 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
