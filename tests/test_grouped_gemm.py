"""grouped_gemm (kernels/grouped_gemm.py) against an fp64 per-group loop, with error budgets.

Error budgets, per output element with inner length n (K for the output, N for da, the
group's row count for db) and S = sum_i |x_i| |y_i| (the same product on absolute values):
- Accumulation in fp32, in any order, with or without FMA: |s - exact| <= gamma_{n+1} S,
  gamma_j = j u / (1 - j u), u = 2**-24 (n products and sums plus the add into the
  accumulator). fp32 inputs: that is the whole budget.
- fp16/bf16 inputs: their products are exact in fp32 (11- or 8-bit significands), then the
  fp32 sum is rounded once to the output dtype: |out - exact| <= u_out |exact| +
  (1 + u_out) gamma_{n+1} S + (half the smallest subnormal step of the output dtype).
- On a GPU the half-precision path runs on tensor cores, whose fp32 adds may truncate
  rather than round: the accumulation term is doubled there (the unit error of
  truncation is 2u).
A kernel bug (a row read from the wrong group, a missed K chunk, TF32 for fp32 inputs)
makes errors of the size of the result, far beyond these bounds.
"""

import importlib.util
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import livethinking.kernels
from livethinking.kernels import grouped_gemm as gg
from livethinking.kernels.grouped_gemm import (CONFIGS, choose_config,
                                               grouped_gemm, grouped_gemm_forward,
                                               grouped_gemm_input_grad, grouped_gemm_reference,
                                               grouped_gemm_weight_grad)

KERNEL_FILE = Path(livethinking.kernels.__path__[0]) / "grouped_gemm.py"
U32 = 2.0 ** -24
NAN = float("nan")


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")

# group sizes: every group of 16 rows or fewer is one interpreter tile (BLOCK_M = 16)
G60 = [0] * 60
for _g, _rows in zip([1, 7, 8, 30, 31, 45, 58], [16, 1, 33, 15, 17, 2, 13]):
    G60[_g] = _rows  # 97 rows; groups 0 and 59 (first, last) and most between are empty
CASES = [
    pytest.param([0] * 8, 24, 40, id="M0-G8"),
    pytest.param([1], 33, 24, id="M1-G1"),
    pytest.param([0, 2, 0, 0, 1, 0, 0, 0], 24, 40, id="M3-G8-empty-first-middle-last"),
    pytest.param([0, 20, 3, 0, 40, 17, 17, 0], 40, 33, id="M97-G8-empty-first-middle-last"),
    pytest.param([97], 33, 24, id="M97-G1"),
    pytest.param(G60, 24, 40, id="M97-G60"),
]


# ----------------------------------------------------------------------------- helpers


def offsets_of(sizes, dtype=torch.int64, device="cpu"):
    return torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0).to(dtype=dtype, device=device)


def make_inputs(sizes, n, k, dtype, generator, device="cpu"):
    """a (M, K), b (G, N, K), grad_out (M, N), offsets (G + 1,), all in dtype on device."""
    m, g = sum(sizes), len(sizes)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    return randn(m, k), randn(g, n, k), randn(m, n), offsets_of(sizes, device=device)


def exact_products(a, b, grad_out, offsets):
    """fp64 per-group loop: {name: (exact value, sum of |x||y|, inner length)} for the
    output, da and db. Inputs in fp16/bf16/fp32 are exact in fp64."""
    a, b, grad_out = a.double(), b.double(), grad_out.double()
    (m, k), (g, n, _) = a.shape, b.shape
    out, out_abs = a.new_zeros(m, n), a.new_zeros(m, n)
    da, da_abs = a.new_zeros(m, k), a.new_zeros(m, k)
    db, db_abs = b.new_zeros(g, n, k), b.new_zeros(g, n, k)
    db_inner = b.new_zeros(g, 1, 1)
    bounds = offsets.tolist()
    for e in range(g):
        lo, hi = bounds[e], bounds[e + 1]
        x, dy, w = a[lo:hi], grad_out[lo:hi], b[e]
        out[lo:hi], out_abs[lo:hi] = x @ w.T, x.abs() @ w.abs().T
        da[lo:hi], da_abs[lo:hi] = dy @ w, dy.abs() @ w.abs()
        db[e], db_abs[e] = dy.T @ x, dy.T.abs() @ x.abs()
        db_inner[e] = hi - lo
    return {"out": (out, out_abs, k), "grad_a": (da, da_abs, n), "grad_b": (db, db_abs, db_inner)}


def assert_within_budget(name, actual, dtype, exact, abs_sum, inner, accumulate_factor=1.0):
    """The budget of the module docstring, element by element (NaN always fails)."""
    assert actual.dtype == dtype, (name, actual.dtype)
    assert actual.shape == exact.shape, (name, actual.shape, exact.shape)
    steps = torch.as_tensor(inner, dtype=torch.float64, device=exact.device) + 1
    accumulate = accumulate_factor * steps * U32 / (1 - steps * U32) * abs_sum
    if dtype == torch.float32:
        budget = accumulate
    else:
        info = torch.finfo(dtype)
        u_out = info.eps / 2
        budget = u_out * exact.abs() + (1 + u_out) * accumulate + info.smallest_normal * info.eps / 2
    error = (actual.double() - exact).abs()
    over = ~(error <= budget)
    if over.any():
        worst = torch.argmax(torch.where(over, error / budget, 0.0))
        raise AssertionError(f"{name}: {int(over.sum())} of {error.numel()} elements over budget; "
                             f"worst at flat index {int(worst)}: error {error.flatten()[worst]:.3g}, "
                             f"budget {budget.flatten()[worst]:.3g}")


def check_against_exact(sizes, n, k, dtype, generator, device="cpu", accumulate_factor=1.0):
    a, b, grad_out, offsets = make_inputs(sizes, n, k, dtype, generator, device)
    a.requires_grad_()
    b.requires_grad_()
    out = grouped_gemm(a, b, offsets)
    out.backward(grad_out)
    expected = exact_products(a.detach(), b.detach(), grad_out, offsets)
    for name, actual in (("out", out.detach()), ("grad_a", a.grad), ("grad_b", b.grad)):
        assert_within_budget(name, actual, dtype, *expected[name], accumulate_factor=accumulate_factor)
    empty = torch.tensor(sizes, device=device) == 0
    assert torch.equal(b.grad[empty], torch.zeros_like(b.grad[empty]))  # exactly zero, not small


# ----------------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("sizes,n,k", CASES)
def test_matches_fp64_loop(sizes, n, k, dtype, generator):
    check_against_exact(sizes, n, k, dtype, generator)


@pytest.mark.parametrize("regime", sorted(CONFIGS))
def test_every_config_is_correct(regime, generator):
    """The GPU tile shapes (large blocks, masks) give the same answers under the interpreter."""
    sizes, n, k = [0, 20, 3, 0, 40, 17, 17, 0], 40, 33
    a, b, grad_out, offsets = make_inputs(sizes, n, k, torch.float32, generator)
    expected = exact_products(a, b, grad_out, offsets)
    config = CONFIGS[regime]
    assert_within_budget("out", grouped_gemm_forward(a, b, offsets, config=config),
                         torch.float32, *expected["out"])
    assert_within_budget("grad_a", grouped_gemm_input_grad(grad_out, b, offsets, config=config),
                         torch.float32, *expected["grad_a"])
    assert_within_budget("grad_b", grouped_gemm_weight_grad(grad_out, a, offsets, config=config),
                         torch.float32, *expected["grad_b"])


def test_poisoned_outputs_are_fully_written_and_nothing_else(generator):
    """Outputs start as NaN inside NaN guard rows: every element is written, no guard row is."""
    sizes, n, k = [0, 20, 3, 0, 40, 17, 17, 0], 40, 33
    a, b, grad_out, offsets = make_inputs(sizes, n, k, torch.float32, generator)
    m, g = a.shape[0], b.shape[0]
    expected = exact_products(a, b, grad_out, offsets)

    def guarded(x):  # x's values between a NaN row above and below; the view is contiguous
        buffer = torch.full((x.shape[0] + 2, *x.shape[1:]), NAN)
        buffer[1:-1] = x
        return buffer, buffer[1:-1]

    _, a_view = guarded(a)
    _, grad_view = guarded(grad_out)
    out_buffer, out = guarded(torch.full((m, n), NAN))
    da_buffer, da = guarded(torch.full((m, k), NAN))
    db = torch.full((g, n, k), NAN)
    grouped_gemm_forward(a_view, b, offsets, out=out)
    grouped_gemm_input_grad(grad_view, b, offsets, out=da)
    grouped_gemm_weight_grad(grad_view, a_view, offsets, out=db)
    for buffer in (out_buffer, da_buffer):
        assert buffer[0].isnan().all() and buffer[-1].isnan().all()
    assert_within_budget("out", out, torch.float32, *expected["out"])
    assert_within_budget("grad_a", da, torch.float32, *expected["grad_a"])
    assert_within_budget("grad_b", db, torch.float32, *expected["grad_b"])
    for e in (0, 3, 7):
        assert torch.equal(db[e], torch.zeros(n, k))


def test_tiles_write_only_their_own_group(generator):
    """Rows past off[G] belong to no group (outside the documented contract, used here as a
    probe): no tile may write them, so a tile that ran past its group's end would show."""
    sizes, n, k = [0, 20, 3, 0, 40, 17, 0], 40, 33
    a, b, grad_out, offsets = make_inputs(sizes, n, k, torch.float32, generator)
    a = torch.cat([a, torch.randn(13, k, generator=generator)])  # 13 rows outside every group
    out = grouped_gemm_forward(a, b, offsets, out=torch.full((a.shape[0], n), NAN))
    da = grouped_gemm_input_grad(torch.cat([grad_out, torch.ones(13, n)]), b, offsets,
                                 out=torch.full((a.shape[0], k), NAN))
    for result, name in ((out, "out"), (da, "grad_a")):
        m = sum(sizes)
        assert result[m:].isnan().all(), name
        assert not result[:m].isnan().any(), name


def test_weight_grad_of_no_rows_is_written_zeros():
    """M = 0: the kernel still runs over every group and overwrites NaN with zeros."""
    offsets = torch.zeros(4, dtype=torch.int32)
    db = torch.full((3, 24, 40), NAN)
    grouped_gemm_weight_grad(torch.empty(0, 24), torch.empty(0, 40), offsets, out=db)
    assert torch.equal(db, torch.zeros(3, 24, 40))


def test_non_contiguous_inputs_and_stride_zero_gradient(generator):
    sizes, n, k = [5, 0, 30, 2], 24, 40
    a, b, _, offsets = make_inputs(sizes, n, k, torch.float32, generator)
    a_t = a.T.contiguous().T.requires_grad_()                 # column-major a
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (G, K, N) storage
    offsets_strided = torch.stack([offsets, offsets], 1)[:, 0]
    assert not (a_t.is_contiguous() or b_t.is_contiguous() or offsets_strided.is_contiguous())
    grouped_gemm(a_t, b_t, offsets_strided).sum().backward()  # grad_out is ones with stride 0
    expected = exact_products(a, b, torch.ones(a.shape[0], n), offsets)
    assert_within_budget("grad_a", a_t.grad, torch.float32, *expected["grad_a"])
    assert_within_budget("grad_b", b_t.grad, torch.float32, *expected["grad_b"])


def test_deterministic_and_offset_dtypes_agree(generator):
    sizes, n, k = [0, 20, 3, 0, 40, 17, 17, 0], 40, 33
    a, b, grad_out, offsets = make_inputs(sizes, n, k, torch.float32, generator)
    results = []
    for offset_dtype in (torch.int64, torch.int32, torch.int64):
        x, w = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = grouped_gemm(x, w, offsets.to(offset_dtype))
        out.backward(grad_out)
        results.append((out, x.grad, w.grad))
    for later in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], later))


def test_reference_matches_the_exact_loop(generator):
    sizes, n, k = [0, 4, 0, 9], 6, 5
    a, b, grad_out, offsets = make_inputs(sizes, n, k, torch.float64, generator)
    a.requires_grad_()
    b.requires_grad_()
    out = grouped_gemm_reference(a, b, offsets)
    out.backward(grad_out)
    expected = exact_products(a.detach(), b.detach(), grad_out, offsets)
    torch.testing.assert_close(out, expected["out"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, expected["grad_a"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, expected["grad_b"][0], rtol=1e-12, atol=1e-12)


def test_choose_config_by_regime(monkeypatch):
    assert choose_config(4096, 8, torch.device("cpu")) == CONFIGS["interpret"]
    monkeypatch.setattr(gg, "_INTERPRET", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    assert choose_config(8, 128, cuda) == CONFIGS["decode"]
    assert choose_config(128 * 40, 128, cuda) == CONFIGS["medium"]
    assert choose_config(16384, 8, cuda) == CONFIGS["prefill"]
    for config in CONFIGS.values():  # tl.dot needs every block dimension >= 16
        for tile in config:
            assert min(tile.block_m, tile.block_n, tile.block_k) >= 16


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
       n=st.integers(1, 40), k=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes(sizes, n, k, dtype, seed):
    check_against_exact(sizes, n, k, dtype, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- standalone file


def test_file_stands_alone(generator):
    name = f"grouped_gemm_standalone_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        a, b, _, offsets = make_inputs([3, 0, 2], 16, 16, torch.float32, generator)
        out = module.grouped_gemm(a, b, offsets)
        expected = exact_products(a, b, torch.zeros(5, 16), offsets)["out"]
        assert_within_budget("out", out, torch.float32, *expected)
        assert set(module.__all__) <= set(vars(module))
    finally:
        del sys.modules[name]


# ----------------------------------------------------------------------------- bad input


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _offsets(g, dtype=torch.int64, device="cpu"):
    return torch.zeros(g + 1, dtype=dtype, device=device)


@pytest.mark.parametrize("args,error,words", [
    ((_t(4), _t(2, 3, 4), _offsets(2)), ValueError, ["a must be 2-D", "(M, K)", "(4,)"]),
    ((_t(4, 4), _t(3, 4), _offsets(2)), ValueError, ["b must be 3-D", "(G, N, K)", "(3, 4)"]),
    ((_t(5, 33), _t(2, 3, 32), _offsets(2)), ValueError, ["K differs", "33", "32", "a is (M, K)"]),
    ((_t(5, 4), _t(8, 3, 4), _offsets(7)), ValueError,
     ["group_offsets", "G + 1 = 9", "G=8", "(8,)"]),
    ((_t(5, 4), _t(2, 3, 4), _offsets(2)[None]), ValueError, ["group_offsets", "1-D", "(1, 3)"]),
    ((_t(5, 4), _t(2, 3, 4), _offsets(2, torch.float32)), TypeError,
     ["group_offsets", "int32 or int64", "torch.float32"]),
    ((_t(5, 4, dtype=torch.float64), _t(2, 3, 4, dtype=torch.float64), _offsets(2)), TypeError,
     ["a must be float32, bfloat16 or float16", "torch.float64"]),
    ((_t(5, 4), _t(2, 3, 4, dtype=torch.float16), _offsets(2)), TypeError,
     ["b must have a's dtype torch.float32", "torch.float16"]),
    ((_t(5, 4), _t(2, 3, 4, device="meta"), _offsets(2)), ValueError, ["b is on meta but a is on cpu"]),
    ((_t(5, 4), _t(2, 3, 4), _offsets(2, device="meta")), ValueError,
     ["group_offsets is on meta but a is on cpu"]),
    ((_t(5, 4, device="meta"), _t(2, 3, 4), _offsets(2)), ValueError, ["b is on cpu but a is on meta"]),
    (([[0.0]], _t(2, 3, 4), _offsets(2)), TypeError, ["a must be a torch.Tensor", "list"]),
    ((_t(5, 4), _t(0, 3, 4), _offsets(0)), ValueError, ["no groups", "M = 5"]),
])
def test_errors_name_the_argument(args, error, words):
    with pytest.raises(error) as raised:
        grouped_gemm(*args)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_launcher_rejects_a_wrong_out():
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(5, 3\)"):
        grouped_gemm_forward(_t(5, 4), _t(2, 3, 4), offsets_of([2, 3]), out=_t(5, 4))


# ----------------------------------------------------------------------------- GPU


def poisoned_cache():
    """Fill the caching allocator's free blocks with NaN so unwritten outputs show."""
    torch.cuda.synchronize()
    junk = torch.full((64 << 20,), NAN, device="cuda")
    del junk


def skewed_sizes(m, g, generator, empty_every=3):
    """m rows over g groups, every empty_every-th group (the first and last among them) empty."""
    empty = torch.zeros(g, dtype=torch.bool)
    empty[::empty_every] = True
    empty[-1] = True
    weights = torch.rand(g, generator=generator) ** 3 + 1e-3
    weights[empty] = 0
    return torch.bincount(torch.multinomial(weights, m, replacement=True, generator=generator),
                          minlength=g).tolist()


@pytest.mark.gpu
class TestOnGpu:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
    @pytest.mark.parametrize("m,g,n,k", [
        (0, 8, 256, 128), (1, 8, 256, 128), (97, 60, 768, 2048), (512, 128, 768, 2048),
        (4096, 60, 1408, 2048), (16384, 8, 1024, 4096 + 33),
    ])
    def test_matches_fp64_loop(self, m, g, n, k, dtype, generator):
        poisoned_cache()
        half = dtype != torch.float32
        check_against_exact(skewed_sizes(m, g, generator), n, k, dtype, generator, device="cuda",
                            accumulate_factor=2.0 if half else 1.0)

    def test_fp32_does_not_use_tf32(self, generator):
        # TF32 keeps 10 mantissa bits: its error would be ~2**-11 relative, far over budget
        check_against_exact(skewed_sizes(2048, 16, generator), 512, 1024, torch.float32, generator,
                            device="cuda")

    def test_deterministic(self, generator):
        a, b, grad_out, offsets = make_inputs(skewed_sizes(8192, 60, generator), 512, 1024,
                                              torch.bfloat16, generator, device="cuda")
        grads = []
        for _ in range(2):
            x, w = a.clone().requires_grad_(), b.clone().requires_grad_()
            grouped_gemm(x, w, offsets).backward(grad_out)
            grads.append((x.grad, w.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

    def test_cuda_graph_capture(self, generator):
        """No host synchronisation: the forward can be captured and replayed."""
        a, b, _, offsets = make_inputs(skewed_sizes(1000, 16, generator), 256, 512,
                                       torch.bfloat16, generator, device="cuda")
        grouped_gemm_forward(a, b, offsets)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = grouped_gemm_forward(a, b, offsets)
        new_sizes = skewed_sizes(1000, 16, generator, empty_every=2)
        offsets.copy_(offsets_of(new_sizes, device="cuda"))
        graph.replay()
        expected = exact_products(a, b, torch.zeros_like(out), offsets)["out"]
        assert_within_budget("out", out, torch.bfloat16, *expected, accumulate_factor=2.0)

    def test_matches_torch_grouped_mm(self, generator):
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch._grouped_mm is missing")
        sizes = skewed_sizes(4096, 32, generator)
        a, b, _, offsets = make_inputs(sizes, 512, 1024, torch.bfloat16, generator, device="cuda")
        ends = offsets[1:].to(torch.int32)
        peer = torch._grouped_mm(a, b.transpose(1, 2), offs=ends)
        ours = grouped_gemm(a, b, offsets)
        expected = exact_products(a, b, torch.zeros_like(ours), offsets)["out"]
        for name, result in (("ours", ours), ("torch._grouped_mm", peer)):  # the same budget for both
            assert_within_budget(name, result, torch.bfloat16, *expected, accumulate_factor=2.0)
