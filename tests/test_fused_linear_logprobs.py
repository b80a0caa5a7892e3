"""fused_linear_logprobs (kernels/fused_linear_logprobs.py) against an fp64 reference that
materialises the logits, with error budgets.

Error budget. Inputs are made in the test dtype (fp32 or fp16), so they are exact in
fp64, and ``exact`` is ``fused_linear_logprobs_reference`` on their fp64 copies. The
"plain" result is the same reference run on the test-dtype inputs: F.linear in that
dtype, softmax in fp32, autograd for the gradients: what a straightforward PyTorch
implementation makes. For every output (logp, entropy, d hidden, d weight, d bias):

    max |ours − exact|  <=  2 · max |plain − exact|  +  4 · u · max |exact|

with u the unit roundoff of that output's dtype (fp32 for logp and entropy, the input
dtype for the gradients); the floor covers a plain result that is exact by luck. A
kernel bug (a missed vocabulary tile, a wrong rescale, a dropped mask, a gradient term
with the wrong sign) makes errors of the size of the result, far beyond this.

Everything here runs under the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 when there is no GPU) in fp32, fp16 and fp64 (the interpreter
computes bf16 tl.dot wrongly); ``TestGPU`` covers bf16, memory and the tile table on a
CUDA device. Sizes stay small (H <= 48, V <= 4099) to keep the interpreter fast.
"""

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import livethinking.kernels
from livethinking.kernels import fused_linear_logprobs as flp
from livethinking.kernels.fused_linear_logprobs import (LogprobsConfig, fused_linear_logprobs,
                                                        fused_linear_logprobs_forward,
                                                        fused_linear_logprobs_reference)

KERNEL_FILE = Path(livethinking.kernels.__path__[0]) / "fused_linear_logprobs.py"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
FP64_ONLY_INTERPRETED = ("float64 runs these kernels only under the Triton interpreter: fp64 tl.dot "
                         "does not compile for NVIDIA GPUs (TestGPU checks the clear error)")
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
        torch.bfloat16: 2.0 ** -8}


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- helpers


def make_inputs(n, v, h, dtype, generator, *, bias=True, device=DEVICE):
    """hidden (N, H), weight (V, H) scaled so logits have std ~2, bias (V,), targets (N,)."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(
            dtype=dtype, device=device)

    hidden = randn(n, h)
    weight = randn(v, h, scale=2.0 / h ** 0.5)
    b = randn(v, scale=0.5) if bias else None
    targets = torch.randint(0, v, (n,), generator=generator).to(device)
    return hidden, weight, b, targets


def run(fn, hidden, weight, bias, targets, g, e, **kwargs):
    """(logp, entropy, d hidden, d weight, d bias) of fn for upstream g (logp) and e
    (entropy); either may be None (then that output takes no part in the loss)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    logp, ent = fn(*leaves, targets, bias=b, return_entropy=True, **kwargs)
    loss = 0
    if g is not None:
        loss = loss + (logp * g.to(logp.dtype)).sum()
    if e is not None:
        loss = loss + (ent * e.to(ent.dtype)).sum()
    inputs = leaves + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    grads = list(grads) + ([None] if b is None else [])
    return [logp.detach(), ent.detach()] + grads


def budget_ratios(hidden, weight, bias, targets, g, e, **kwargs):
    """({name: error / budget} for our five results, ours, exact); see the module docstring."""
    ours = run(fused_linear_logprobs, hidden, weight, bias, targets, g, e, **kwargs)
    kwargs.pop("chunk_size", None)
    plain = run(fused_linear_logprobs_reference, hidden, weight, bias, targets, g, e, **kwargs)
    hidden64, weight64 = hidden.double(), weight.double()
    bias64 = bias.double() if bias is not None else None
    exact = run(fused_linear_logprobs_reference, hidden64, weight64, bias64, targets,
                g.double() if g is not None else None, e.double() if e is not None else None,
                **kwargs)
    logits = torch.nn.functional.linear(hidden64, weight64, bias64) / kwargs.get("temperature", 1.0)
    conditioning = 1 + (logits.abs().max().item() if logits.numel() else 0.0)
    names = ["logp", "entropy", "d hidden", "d weight", "d bias"]
    out_dtypes = [torch.float32, torch.float32] + [hidden.dtype] * 3
    ratios = {}
    for name, o, p, x, out_dtype in zip(names, ours, plain, exact, out_dtypes):
        if x is None:
            assert o is None, name
            continue
        assert o.dtype == out_dtype and o.shape == x.shape, (name, o.dtype, o.shape)
        assert torch.isfinite(o).all(), name
        if x.numel() == 0:
            continue
        err = (o.double() - x).abs().max().item()
        plain_err = (p.double() - x).abs().max().item()
        floor = 4 * x.abs().max().item() * (UNIT[out_dtype] + UNIT[torch.float32] * conditioning)
        ratios[name] = err / (2 * plain_err + floor) if err else 0.0
    return ratios, ours, exact


def check_against_exact(hidden, weight, bias, targets, g, e, **kwargs):
    """Our five results against exact (fp64 reference) within the budget of plain PyTorch."""
    ratios, ours, exact = budget_ratios(hidden, weight, bias, targets, g, e, **kwargs)
    assert all(r <= 1 for r in ratios.values()), ratios
    return ours, exact


def upstream(n, generator, which="both"):
    g = torch.randn(n, generator=generator).to(DEVICE) if which in ("both", "logp") else None
    e = torch.randn(n, generator=generator).to(DEVICE) if which in ("both", "entropy") else None
    return g, e


# ----------------------------------------------------------------------------- values and gradients

SHAPES = [pytest.param(1, 997, 32, id="N1-V997-H32"),
          pytest.param(3, 4099, 48, id="N3-V4099-H48"),
          pytest.param(67, 997, 48, id="N67-V997-H48")]
VARIANTS = [pytest.param(1.0, False, id="T1-nobias"), pytest.param(0.7, True, id="T0.7-bias")]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("temperature,with_bias", VARIANTS)
@pytest.mark.parametrize("n,v,h", SHAPES)
def test_values_and_gradients(n, v, h, temperature, with_bias, dtype, generator):
    hidden, weight, bias, targets = make_inputs(n, v, h, dtype, generator, bias=with_bias)
    g, e = upstream(n, generator)
    check_against_exact(hidden, weight, bias, targets, g, e, temperature=temperature,
                        chunk_size=16 if n > 16 else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_each_upstream_gradient_alone(which, dtype, generator):
    hidden, weight, bias, targets = make_inputs(67, 997, 48, dtype, generator)
    g, e = upstream(67, generator, which)
    check_against_exact(hidden, weight, bias, targets, g, e, temperature=0.7, chunk_size=29)


def test_logp_only_return_and_sum_upstream(generator):
    """return_entropy=False, loss = logp.sum(): the upstream gradient arrives expanded
    (stride 0) and the entropy output gets none."""
    hidden, weight, bias, targets = make_inputs(67, 997, 32, torch.float32, generator)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp = fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], chunk_size=20)
    assert isinstance(logp, torch.Tensor) and logp.shape == (67,)
    ours = torch.autograd.grad(logp.sum(), leaves)
    exact = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref = torch.autograd.grad(fused_linear_logprobs_reference(exact[0], exact[1], targets,
                                                              bias=exact[2]).sum(), exact)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 20, 66, None])
def test_backward_chunks_split_rows_unevenly(chunk_size, generator):
    n = 67 if chunk_size != 1 else 9
    hidden, weight, bias, targets = make_inputs(n, 997, 32, torch.float32, generator)
    mask = torch.rand(n, generator=generator).to(DEVICE) > 0.25
    g, e = upstream(n, generator)
    check_against_exact(hidden, weight, bias, targets, g, e, temperature=0.7, row_mask=mask,
                        chunk_size=chunk_size)


@settings(max_examples=max(8, settings.default.max_examples // 3))
@given(n=st.integers(1, 40), v=st.integers(1, 1100), h=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.7, 2.5]),
       with_bias=st.booleans(), masked=st.sampled_from([0.0, 0.3, 1.0]),
       chunk_size=st.one_of(st.none(), st.integers(1, 40)), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(n, v, h, dtype, temperature, with_bias, masked, chunk_size, seed):
    """Awkward sizes: V or H below, at and above one tile, V = 1, H = 1, any chunking."""
    generator = torch.Generator().manual_seed(seed)
    hidden, weight, bias, targets = make_inputs(n, v, h, dtype, generator, bias=with_bias)
    mask = (torch.rand(n, generator=generator) >= masked).to(DEVICE)
    g, e = upstream(n, generator)
    check_against_exact(hidden, weight, bias, targets, g, e, temperature=temperature,
                        row_mask=mask, chunk_size=chunk_size)


def test_int32_targets_and_noncontiguous_inputs(generator):
    hidden, weight, bias, targets = make_inputs(35, 997, 32, torch.float32, generator)
    hidden_nc = torch.stack([hidden, -hidden], dim=2)[:, :, 0]  # strides (2H, 2)
    weight_nc = weight.t().contiguous().t()                        # strides (1, V)
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous()
    g, e = upstream(35, generator)
    ours, _ = check_against_exact(hidden_nc, weight_nc, bias, targets.int(), g, e, chunk_size=16)
    again = run(fused_linear_logprobs, hidden, weight, bias, targets, g, e, chunk_size=16)
    for a, b in zip(ours, again):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backward_is_deterministic(generator):
    hidden, weight, bias, targets = make_inputs(40, 997, 32, torch.float16, generator)
    g, e = upstream(40, generator)
    first = run(fused_linear_logprobs, hidden, weight, bias, targets, g, e, chunk_size=13)
    second = run(fused_linear_logprobs, hidden, weight, bias, targets, g, e, chunk_size=13)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch(generator):
    hidden, weight, bias, targets = make_inputs(0, 97, 16, torch.float32, generator)
    g, e = upstream(0, generator)
    logp, ent, dx, dw, db = run(fused_linear_logprobs, hidden, weight, bias, targets, g, e)
    assert logp.shape == ent.shape == (0,) and dx.shape == (0, 16)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


# ----------------------------------------------------------------------------- vocabulary splits


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_vocabulary_splits_merge_exactly(num_splits, generator):
    """The split-vocabulary forward (GPU, few rows) merges partial (m, s, t, z_target)."""
    hidden, weight, bias, targets = make_inputs(40, 4099, 32, torch.float32, generator)
    mask = torch.ones(40, dtype=torch.bool, device=DEVICE)
    mask[16:32] = False  # one whole row block masked (BLOCK_M = 16 when interpreting)
    mask[3] = False
    one = fused_linear_logprobs_forward(hidden, weight, targets, bias, 0.7, mask, num_splits=1)
    split = fused_linear_logprobs_forward(hidden, weight, targets, bias, 0.7, mask,
                                          num_splits=num_splits)
    exact = fused_linear_logprobs_reference(hidden.double(), weight.double(), targets,
                                            bias=bias.double(), temperature=0.7,
                                            return_entropy=True, row_mask=mask)
    for a, b, x in zip(one[:2], split[:2], exact):
        assert torch.equal(b[~mask], torch.zeros_like(b[~mask]))
        torch.testing.assert_close(b.double(), x, rtol=0, atol=2e-5)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(one[2], split[2])  # the row maximum: the max of the splits' maxima
    torch.testing.assert_close(one[3], split[3], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- row mask


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_some_rows_masked(dtype, generator):
    n = 67
    hidden, weight, bias, targets = make_inputs(n, 997, 48, dtype, generator)
    mask = torch.rand(n, generator=generator).to(DEVICE) > 0.4
    mask[16:32] = False                      # a whole row block
    targets = torch.where(mask, targets, -100)  # masked rows' targets are never read
    g, e = upstream(n, generator)
    ours, _ = check_against_exact(hidden, weight, bias, targets, g, e, temperature=0.7,
                                  row_mask=mask, chunk_size=24)
    logp, ent, dx = ours[:3]
    assert torch.equal(logp[~mask], torch.zeros_like(logp[~mask]))
    assert torch.equal(ent[~mask], torch.zeros_like(ent[~mask]))
    assert torch.equal(dx[~mask], torch.zeros_like(dx[~mask]))


def test_all_rows_masked(generator):
    hidden, weight, bias, targets = make_inputs(35, 997, 32, torch.float32, generator)
    mask = torch.zeros(35, dtype=torch.bool, device=DEVICE)
    g, e = upstream(35, generator)
    logp, ent, dx, dw, db = run(fused_linear_logprobs, hidden, weight, bias, targets.fill_(-1),
                                g, e, row_mask=mask, chunk_size=16)
    for t in (logp, ent, dx, dw, db):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.skipif(not INTERPRET, reason="counts tl.dot calls of the Triton interpreter")
def test_fully_masked_row_blocks_do_no_gemm_work(monkeypatch, generator):
    from triton.runtime import interpreter

    calls = []
    create_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, *a, **k: calls.append(1) or create_dot(self, *a, **k))
    cfg = flp.INTERPRETER_CONFIG.logits
    n, v, h = 3 * cfg.block_m, 997, 48
    per_block = triton_cdiv(v, cfg.block_v) * triton_cdiv(h, cfg.block_h)
    wcfg = flp.INTERPRETER_CONFIG.weight_grad
    assert wcfg.block_m == cfg.block_m  # the d W kernel's row steps are the same row blocks
    per_weight_tile_step = triton_cdiv(v, wcfg.block_v) * triton_cdiv(h, wcfg.block_h)
    hidden, weight, bias, targets = make_inputs(n, v, h, torch.float32, generator)
    g, e = upstream(n, generator)
    for active_blocks in (0, 1, 3):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:active_blocks * cfg.block_m:5] = True   # a few rows in each of the first blocks
        calls.clear()
        fused_linear_logprobs(hidden, weight, targets, bias=bias, row_mask=mask)
        assert len(calls) == active_blocks * per_block
        x = hidden.clone().requires_grad_()  # weight frozen: the d W kernel does not run
        logp, ent = fused_linear_logprobs(x, weight, targets, bias=bias, row_mask=mask,
                                          return_entropy=True, chunk_size=n)
        calls.clear()
        torch.autograd.grad((logp * g).sum() + (ent * e).sum(), x)
        assert len(calls) == active_blocks * per_block  # the dZ kernel's tiles
        w = weight.clone().requires_grad_()  # now the d W kernel runs too
        logp, ent = fused_linear_logprobs(hidden, w, targets, bias=bias, row_mask=mask,
                                          return_entropy=True, chunk_size=n)
        calls.clear()
        (dw,) = torch.autograd.grad((logp * g).sum() + (ent * e).sum(), w)
        # each d W tile program: one tl.dot per row step with an unmasked row
        assert len(calls) == active_blocks * (per_block + per_weight_tile_step)
        if active_blocks == 0:
            assert torch.equal(dw, torch.zeros_like(dw))


def triton_cdiv(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------- gradcheck (fp64)


def _gradcheck(n, v, h, generator, fast_mode, **kwargs):
    hidden, weight, bias, targets = make_inputs(n, v, h, torch.float64, generator)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    def fn(x, w, b):
        return fused_linear_logprobs(x, w, targets, bias=b, return_entropy=True, **kwargs)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast_mode)


@pytest.mark.skipif(not INTERPRET, reason=FP64_ONLY_INTERPRETED)
def test_gradcheck_float64_full(generator):
    """The kernels themselves in fp64 (the interpreter runs fp64 tl.dot): every Jacobian entry."""
    _gradcheck(2, 5, 8, generator, fast_mode=False, temperature=0.5, chunk_size=1)


@pytest.mark.skipif(not INTERPRET, reason=FP64_ONLY_INTERPRETED)
@pytest.mark.parametrize("n,v,h,mask", [(3, 21, 16, [True, False, True]), (35, 600, 20, None)])
def test_gradcheck_float64_fast(n, v, h, mask, generator):
    row_mask = torch.tensor(mask, device=DEVICE) if mask is not None else None
    _gradcheck(n, v, h, generator, fast_mode=True, temperature=0.7, chunk_size=16,
               row_mask=row_mask)


@pytest.mark.skipif(not INTERPRET, reason=FP64_ONLY_INTERPRETED)
def test_float64_matches_reference_to_roundoff(generator):
    hidden, weight, bias, targets = make_inputs(35, 997, 32, torch.float64, generator)
    g, e = upstream(35, generator)
    ours = run(fused_linear_logprobs, hidden, weight, bias, targets, g.double(), e.double(),
               temperature=0.5, chunk_size=16)
    ref = run(fused_linear_logprobs_reference, hidden, weight, bias, targets, g.double(),
              e.double(), temperature=0.5)
    for o, r in zip(ours, ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- forward-only path


class _CountSaved:
    """Counts tensors saved for backward while active."""

    def __init__(self):
        self.count = 0

    def pack(self, t):
        self.count += 1
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)


def test_forward_only_path_saves_nothing(monkeypatch, generator):
    hidden, weight, bias, targets = make_inputs(20, 997, 32, torch.float32, generator)
    with_grad = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with _CountSaved() as saved:
        logp, ent = fused_linear_logprobs(*with_grad[:2], targets, bias=with_grad[2],
                                          return_entropy=True)
    assert logp.grad_fn is not None and saved.count > 0  # the hook sees the grad path

    def no_apply(*args):
        raise AssertionError("the autograd Function ran on the forward-only path")

    monkeypatch.setattr(flp.FusedLinearLogprobsFunction, "apply", no_apply)
    cases = [(torch.no_grad, with_grad), (torch.enable_grad, [hidden, weight, bias])]
    for mode, (x, w, b) in cases:
        with _CountSaved() as saved, mode():
            logp2, ent2 = fused_linear_logprobs(x, w, targets, bias=b, return_entropy=True)
        assert saved.count == 0
        for t in (logp2, ent2):
            assert t.grad_fn is None and not t.requires_grad
        assert torch.equal(logp2, logp.detach()) and torch.equal(ent2, ent.detach())


# ----------------------------------------------------------------------------- standalone file


def test_file_stands_alone(generator):
    name = f"fused_linear_logprobs_standalone_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.__all__) <= set(vars(module))
        hidden, weight, bias, targets = make_inputs(5, 97, 16, torch.float32, generator)
        logp = module.fused_linear_logprobs(hidden, weight, targets, bias=bias)
        ref = fused_linear_logprobs_reference(hidden.double(), weight.double(), targets,
                                              bias=bias.double())
        torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-5)
    finally:
        del sys.modules[name]


def test_public_names():
    assert set(flp.__all__) <= set(vars(flp))
    for name in ("fused_linear_logprobs", "fused_linear_logprobs_reference"):
        assert name in flp.__all__


# ----------------------------------------------------------------------------- bad input


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


X, W, Y = _t(4, 8), _t(10, 8), _t(4, dtype=torch.int64)


@pytest.mark.parametrize("call,error,words", [
    (lambda: fused_linear_logprobs(_t(2, 4, 8), W, Y), ValueError, ["hidden", "2-D", "(2, 4, 8)"]),
    (lambda: fused_linear_logprobs(X, _t(10, 9), Y), ValueError, ["weight", "(V, H)", "H = 8", "(10, 9)"]),
    (lambda: fused_linear_logprobs(X, _t(10), Y), ValueError, ["weight", "2-D"]),
    (lambda: fused_linear_logprobs(X, _t(0, 8), Y), ValueError, ["weight", "V >= 1"]),
    (lambda: fused_linear_logprobs(X, W, _t(5, dtype=torch.int64)), ValueError, ["targets", "(4,)", "(5,)"]),
    (lambda: fused_linear_logprobs(X, W, _t(4)), TypeError, ["targets", "int32 or int64", "float32"]),
    (lambda: fused_linear_logprobs(X, W, Y, bias=_t(9)), ValueError, ["bias", "(10,)", "(9,)"]),
    (lambda: fused_linear_logprobs(X, W, Y, bias=_t(10, dtype=torch.float16)), TypeError,
     ["bias", "torch.float32", "torch.float16"]),
    (lambda: fused_linear_logprobs(X, _t(10, 8, dtype=torch.float16), Y), TypeError,
     ["weight", "torch.float32", "torch.float16"]),
    (lambda: fused_linear_logprobs(X.int(), W.int(), Y), TypeError, ["hidden", "float32", "torch.int32"]),
    (lambda: fused_linear_logprobs(X, W, Y, temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
    (lambda: fused_linear_logprobs(X, W, Y, temperature=-1.0), ValueError, ["temperature", "> 0"]),
    (lambda: fused_linear_logprobs(X, W, Y, temperature=float("inf")), ValueError, ["temperature", "finite"]),
    (lambda: fused_linear_logprobs(X, W, Y, temperature=torch.tensor(1.0)), TypeError, ["temperature"]),
    (lambda: fused_linear_logprobs(X, W, Y, row_mask=_t(4)), TypeError, ["row_mask", "bool", "float32"]),
    (lambda: fused_linear_logprobs(X, W, Y, row_mask=_t(3, dtype=torch.bool)), ValueError,
     ["row_mask", "(4,)", "(3,)"]),
    (lambda: fused_linear_logprobs(X, W, Y, chunk_size=0), ValueError, ["chunk_size", ">= 1"]),
    (lambda: fused_linear_logprobs([[0.0]], W, Y), TypeError, ["hidden", "torch.Tensor", "list"]),
    (lambda: fused_linear_logprobs(X, W, Y.tolist()), TypeError, ["targets", "torch.Tensor"]),
    (lambda: fused_linear_logprobs(X, W, Y.to("meta")), ValueError, ["targets", "meta", "hidden"]),
])
def test_errors_name_the_argument(call, error, words):
    with pytest.raises(error) as raised:
        call()
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


@pytest.mark.skipif(DEVICE != "cpu", reason="only a CPU run without the interpreter is rejected")
def test_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setattr(flp, "_INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_linear_logprobs(X, W, Y)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
class TestGPU:
    """Needs CUDA (skipped otherwise): bf16, the tile table, memory, vocabulary splits."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
    def test_llm_sized_vocabulary(self, dtype, generator):
        hidden, weight, bias, targets = make_inputs(300, 32000, 256, dtype, generator,
                                                    device="cuda")
        mask = torch.rand(300, generator=generator).cuda() > 0.2
        g, e = upstream(300, generator)
        check_against_exact(hidden, weight, bias, targets, g.cuda(), e.cuda(), temperature=0.7,
                            row_mask=mask, chunk_size=128)

    def test_forward_never_allocates_logits(self, generator):
        n, v, h = 4096, 32000, 512
        hidden, weight, _, targets = make_inputs(n, v, h, torch.bfloat16, generator, bias=False,
                                                 device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra < n * v * 2 // 16, extra  # far below one bf16 (N, V) logits tensor

    def test_float64_is_refused_by_the_kernels_and_computed_by_the_ops(self, generator):
        from livethinking.ops import fused_linear_logprobs as ops_logprobs

        hidden, weight, bias, targets = make_inputs(37, 997, 24, torch.float64, generator,
                                                    device="cuda")
        with pytest.raises(TypeError, match="hidden must be float32, bfloat16 or float16 on CUDA"):
            fused_linear_logprobs(hidden, weight, targets, bias=bias)
        mask = torch.rand(37, generator=generator).cuda() > 0.3
        g, e = upstream(37, generator)
        ours = run(ops_logprobs, hidden, weight, bias, targets, g.double().cuda(),
                   e.double().cuda(), temperature=0.5, row_mask=mask)
        ref = run(fused_linear_logprobs_reference, hidden, weight, bias, targets,
                  g.double().cuda(), e.double().cuda(), temperature=0.5, row_mask=mask)
        for o, r in zip(ours, ref):
            assert o.dtype == torch.float64 and o.is_cuda
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)

    def test_config_table_and_splits(self, generator):
        cfg = flp.select_config("cuda", torch.bfloat16)
        assert isinstance(cfg, LogprobsConfig) and cfg != flp.INTERPRETER_CONFIG
        hidden, weight, bias, targets = make_inputs(20, 50000, 128, torch.float32, generator,
                                                    device="cuda")
        auto = fused_linear_logprobs_forward(hidden, weight, targets, bias, 1.0)
        one = fused_linear_logprobs_forward(hidden, weight, targets, bias, 1.0, num_splits=1)
        for a, b in zip(auto, one):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
