"""The fused MoE layer: Triton kernels (interpreted here) and the CPU path of livethinking.ops.

Forward and every gradient against a float64 per-expert loop; error budgets relative to
what plain PyTorch makes in the same dtype; parity with transformers' Qwen3-MoE block.
"""

import importlib.util
import os
import uuid

import pytest
import torch
import torch.nn.functional as F

import livethinking.kernels
from livethinking import ops
from livethinking.kernels.fused_moe import fused_moe, fused_moe_reference, moe_routing

HIDDEN, INTERMEDIATE = 40, 24  # not multiples of the interpreter's 32-wide blocks
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def layer_inputs(num_tokens, num_experts, top_k, generator, dtype=torch.float32, dead=0.5,
                 hidden=HIDDEN, intermediate=INTERMEDIATE):
    """x, weights and a routing in which a fraction ``dead`` of the experts gets no token."""
    x = torch.randn(num_tokens, hidden, generator=generator)
    w_gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, intermediate, generator=generator) / intermediate**0.5
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    live = max(top_k, int(num_experts * (1 - dead)))
    logits[:, live:] -= 1e4
    topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    return x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype), topk_weights, topk_ids


def plain_layer(x, w_gate_up, w_down, topk_weights, topk_ids):
    """The layer as plain PyTorch computes it in the inputs' own dtype (the error yardstick)."""
    out = torch.zeros_like(x)
    for expert in range(w_gate_up.shape[0]):
        token, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
        gate, up = F.linear(x[token], w_gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[expert])
        out = out.index_add(0, token, y * topk_weights[token, slot, None].to(x.dtype))
    return out


def run_with_grads(fn, inputs, upstream, topk_ids):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, topk_ids)
    if out.requires_grad:  # an empty batch may build no graph at all
        out.backward(upstream.to(out.dtype))
    return [out.detach()] + [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
                             for leaf in leaves]


def roundoff_scales(inputs, upstream, topk_ids):
    """First-order roundoff magnitudes of the layer's five results, float64.

    Each result is a chain of dot products (over H for gate/up and for d act, over I for y,
    over tokens for the weight gradients); a dot product's rounding error is a few units of
    Σ|terms|, not of |result|, and it travels on through the chain. With
    g, u = x·W_g, x·W_u (term sums M_g, M_u), a = silu(g)·u and
    M_a = |silu'(g)·u|·M_g + |silu(g)|·M_u + |a| (a's sensitivity to those errors), and the same
    for the backward's d a = W_d^T (w·upstream), d g and d u, these are the Σ|terms| of each
    result with every upstream error carried in at first order. The floor of the budget is
    a few units of the dtype's roundoff of them.
    """
    x, w_gate_up, w_down = (t.double() for t in inputs[:3])
    weights, ids = inputs[3].double(), topk_ids.long()
    dy = upstream.double()
    tokens, top_k = ids.shape
    hidden = w_down.shape[1]
    if tokens == 0:
        return [torch.zeros(0, dtype=torch.float64)] * 2 + [
            torch.zeros(w_gate_up.shape, dtype=torch.float64),
            torch.zeros(w_down.shape, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]
    w_g, w_u = w_gate_up[ids].chunk(2, dim=2)  # (T, k, I, H) each
    down = w_down[ids]  # (T, k, H, I)
    g = torch.einsum("th,tkih->tki", x, w_g)
    u = torch.einsum("th,tkih->tki", x, w_u)
    m_g = torch.einsum("th,tkih->tki", x.abs(), w_g.abs())
    m_u = torch.einsum("th,tkih->tki", x.abs(), w_u.abs())
    sig = torch.sigmoid(g)
    silu, dsilu = g * sig, sig * (1 + g * (1 - sig))
    ddsilu = sig * (1 - sig) * (2 + g * (1 - 2 * sig))
    act = silu * u
    m_act = (dsilu * u).abs() * m_g + silu.abs() * m_u + act.abs()  # (T, k, I)
    y = torch.einsum("tki,tkhi->tkh", act, down)
    m_y = torch.einsum("tki,tkhi->tkh", m_act, down.abs())  # (T, k, H)
    out = (weights[..., None] * m_y).sum(1)  # (T, H)
    d_y = weights[..., None] * dy[:, None, :]  # (T, k, H)
    d_act = torch.einsum("tkh,tkhi->tki", d_y, down)
    m_dact = torch.einsum("tkh,tkhi->tki", d_y.abs(), down.abs()) + d_act.abs()
    d_g, d_u = d_act * u * dsilu, d_act * silu
    m_dg = m_dact * (u * dsilu).abs() + d_act.abs() * (dsilu.abs() * m_u + (u * ddsilu).abs() * m_g)
    m_du = m_dact * silu.abs() + d_act.abs() * dsilu.abs() * m_g
    d_x = (torch.einsum("tki,tkih->th", m_dg, w_g.abs())
           + torch.einsum("tki,tkih->th", m_du, w_u.abs()))
    d_gate_up = torch.zeros(w_gate_up.shape, dtype=torch.float64)
    d_down = torch.zeros(w_down.shape, dtype=torch.float64)
    flat = ids.reshape(-1)
    d_gate_up.index_add_(0, flat, torch.cat([
        torch.einsum("tki,th->tkih", m_dg, x.abs()),
        torch.einsum("tki,th->tkih", m_du, x.abs())], dim=2).reshape(-1, *w_gate_up.shape[1:]))
    d_down.index_add_(0, flat, torch.einsum("tkh,tki->tkhi", d_y.abs(), m_act)
                      .reshape(-1, hidden, w_down.shape[2]))
    d_weights = (dy.abs()[:, None, :] * (m_y + y.abs())).sum(-1)  # (T, k)
    return [out, d_x, d_gate_up, d_down, d_weights]


def assert_within_plain_budget(fn, inputs, topk_ids, generator, factor=2.0):
    """Output and gradients of ``fn``: error vs float64 at most ``factor`` × plain PyTorch's
    error in the same dtype, plus a few units of the dtype's roundoff of the result's term
    magnitudes (``roundoff_scales``: plain PyTorch's own error is one sample of an order of
    summation and may by luck be far below what another order legitimately makes)."""
    dtype = inputs[0].dtype
    upstream = torch.randn(inputs[0].shape, generator=generator).to(inputs[0].device)
    exact = run_with_grads(fused_moe_reference, [t.double() for t in inputs], upstream.double(),
                           topk_ids)
    plain = run_with_grads(plain_layer, inputs, upstream, topk_ids)
    ours = run_with_grads(fn, inputs, upstream, topk_ids)
    names = ["out", "d x", "d w_gate_up", "d w_down", "d topk_weights"]
    scales = roundoff_scales(inputs, upstream, topk_ids)
    for name, o, p, e, scale in zip(names, ours, plain, exact, scales):
        assert o.shape == e.shape and o.dtype == p.dtype, name
        assert torch.isfinite(o).all(), name
        ours_error = (o.double() - e).abs().amax().item() if e.numel() else 0.0
        plain_error = (p.double() - e).abs().amax().item() if e.numel() else 0.0
        floor = 4 * EPS[dtype] * (scale.amax().item() if e.numel() else 0.0)
        assert ours_error <= factor * plain_error + floor, (name, ours_error, plain_error, floor)


@pytest.mark.parametrize("num_tokens", [1, 3, 97])
@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 2), (8, 8), (60, 2), (60, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_match_float64(num_tokens, num_experts, top_k, dtype, generator):
    inputs = layer_inputs(num_tokens, num_experts, top_k, generator, dtype)
    assert_within_plain_budget(fused_moe, inputs[:4], inputs[4], generator)


@pytest.mark.parametrize("num_tokens,top_k", [(1, 1), (1, 8), (3, 2)])
def test_decode_kernel_matches_float64(num_tokens, top_k, generator):
    inputs = layer_inputs(num_tokens, 60, top_k, generator)

    def decode(*args):
        return fused_moe(*args, tile_config=dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=64))

    assert_within_plain_budget(decode, inputs[:4], inputs[4], generator)


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 97])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_float64(num_tokens, num_experts, top_k, dtype, generator):
    inputs = layer_inputs(num_tokens, num_experts, top_k, generator, dtype)
    assert_within_plain_budget(ops.fused_moe, inputs[:4], inputs[4], generator)


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 97])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_path_matches_float64_and_the_training_path(num_tokens, num_experts, top_k,
                                                                   dtype, generator, monkeypatch):
    """``grouped`` without autograd: grouped GEMMs on the CPU (half the experts get no
    token): float32 by the C++ skinny GEMM, bfloat16 by ``torch._grouped_mm``; the
    per-expert loop's values up to roundoff."""
    x, w_gate_up, w_down, weights, ids = layer_inputs(num_tokens, num_experts, top_k, generator, dtype)
    from livethinking.ops import moe_layer

    assert moe_layer._has_cpu_grouped_mm(dtype)  # probed (and cached) before the count starts
    calls = {"skinny": [], "grouped_mm": []}
    real_mm, real_skinny = torch._grouped_mm, moe_layer.grouped_linear
    monkeypatch.setattr(torch, "_grouped_mm",
                        lambda *a, **k: calls["grouped_mm"].append(1) or real_mm(*a, **k))
    monkeypatch.setattr(moe_layer, "grouped_linear",
                        lambda *a, **k: calls["skinny"].append(1) or real_skinny(*a, **k))
    with torch.no_grad():
        ours = ops.fused_moe(x, w_gate_up, w_down, weights, ids, grouped=True)
    # the grouped GEMMs ran (H=40, I=24: 16-byte aligned, as torch._grouped_mm wants)
    assert len(calls["grouped_mm"]) == (0 if dtype == torch.float32 else 2)
    assert len(calls["skinny"]) == (2 if dtype == torch.float32 else 1)  # bf16: declined once
    calls = calls["grouped_mm"] if dtype != torch.float32 else calls["skinny"]
    with torch.no_grad():
        plain = plain_layer(x, w_gate_up, w_down, weights, ids)
    exact = fused_moe_reference(x.double(), w_gate_up.double(), w_down.double(), weights.double(), ids)
    assert ours.dtype == dtype and ours.shape == x.shape and torch.isfinite(ours).all()
    scale = roundoff_scales((x, w_gate_up, w_down, weights), torch.zeros_like(x), ids)[0]
    floor = 4 * EPS[dtype] * (scale.amax().item() if num_tokens else 0.0)
    ours_error = (ours.double() - exact).abs().amax().item() if num_tokens else 0.0
    plain_error = (plain.double() - exact).abs().amax().item() if num_tokens else 0.0
    assert ours_error <= 2 * plain_error + floor
    trained = ops.fused_moe(x, w_gate_up.requires_grad_(), w_down, weights, ids)  # the loop
    assert len(calls) == 2
    assert torch.allclose(ours, trained.detach(), rtol=0, atol=floor + 2 * plain_error)


def test_cpu_inference_path_falls_back_to_the_loop_on_unaligned_sizes(generator, monkeypatch):
    """torch's CPU grouped GEMM wants 16-byte strides: in bfloat16 H=7 (14 bytes) takes the
    loop, same result (float32 takes the skinny GEMM, which has no such rule)."""
    x, w_gate_up, w_down, weights, ids = layer_inputs(9, 8, 2, generator, torch.bfloat16,
                                                      hidden=7, intermediate=5)
    calls, real = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        grouped = ops.fused_moe(x, w_gate_up, w_down, weights, ids, grouped=True)
        loop = ops.fused_moe(x, w_gate_up, w_down, weights, ids)
    assert calls == [] and torch.equal(grouped, loop)


def test_routing_matches_the_cpp_alignment(generator):
    *_, topk_ids = layer_inputs(97, 60, 8, generator)
    sorted_pairs, offsets, row_of_pair = moe_routing(topk_ids, 60)
    alignment = ops.moe_align(topk_ids, 60, 1)
    assert torch.equal(sorted_pairs, alignment.sorted_ids)
    assert torch.equal(offsets, alignment.expert_offsets)
    assert torch.equal(row_of_pair, alignment.row_of_pair)


def test_weight_gradients_of_unused_experts_are_exactly_zero(generator):
    x, w_gate_up, w_down, topk_weights, topk_ids = layer_inputs(13, 8, 2, generator, dead=0.75)
    used = torch.zeros(8, dtype=torch.bool)
    used[topk_ids.unique()] = True
    assert not used.all()
    for fn in (fused_moe, ops.fused_moe):
        grads = run_with_grads(fn, [x, w_gate_up, w_down, topk_weights],
                               torch.randn(13, HIDDEN, generator=generator), topk_ids)
        for grad in grads[2:4]:
            assert torch.equal(grad[~used], torch.zeros_like(grad[~used]))
            assert torch.all(grad[used].abs().amax(dim=(1, 2)) > 0)


def test_deterministic(generator):
    inputs = layer_inputs(97, 8, 2, generator)
    upstream = torch.randn(97, HIDDEN, generator=generator)
    first = run_with_grads(fused_moe, inputs[:4], upstream, inputs[4])
    second = run_with_grads(fused_moe, inputs[:4], upstream, inputs[4])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("implementation", ["triton", "cpu"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_parity_with_transformers_qwen3_moe_block(implementation, norm_topk_prob, generator):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob)
    config._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    x = torch.randn(2, 11, HIDDEN, generator=generator)
    upstream = torch.randn(2, 11, HIDDEN, generator=generator)

    x_theirs = x.clone().requires_grad_()
    block(x_theirs).backward(upstream)
    theirs = [x_theirs.grad] + [p.grad for p in (block.gate.weight, block.experts.gate_up_proj,
                                                 block.experts.down_proj)]
    expected = block(x).detach()

    gate = block.gate.weight.detach().clone().requires_grad_()
    gate_up = block.experts.gate_up_proj.detach().clone().requires_grad_()
    down = block.experts.down_proj.detach().clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    flat = x_ours.reshape(-1, HIDDEN)
    weights, ids = ops.moe_topk_softmax(F.linear(flat, gate), 2, norm_topk_prob)
    layer = fused_moe if implementation == "triton" else ops.fused_moe
    out = layer(flat, gate_up, down, weights, ids).reshape(x.shape)
    out.backward(upstream)
    assert torch.allclose(out, expected, rtol=0, atol=1e-5 * expected.abs().max())
    for name, ours, reference in zip(["x", "gate", "gate_up_proj", "down_proj"],
                                     [x_ours.grad, gate.grad, gate_up.grad, down.grad], theirs):
        assert torch.allclose(ours, reference, rtol=0, atol=1e-5 * reference.abs().max()), name


def test_kernel_file_runs_when_vendored():
    path = os.path.join(livethinking.kernels.__path__[0], "fused_moe.py")
    spec = importlib.util.spec_from_file_location(f"vendored_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = layer_inputs(5, 8, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(module.fused_moe(*inputs), fused_moe_reference(*inputs), atol=1e-5)


@pytest.mark.parametrize("layer", [fused_moe, ops.fused_moe], ids=["triton", "ops"])
def test_bad_input(layer, generator):
    x, w_gate_up, w_down, topk_weights, topk_ids = layer_inputs(5, 8, 2, generator)
    cases = [
        ((x[0], w_gate_up, w_down, topk_weights, topk_ids), ValueError, r"x must be 2-D \(tokens, hidden\)"),
        ((x, w_gate_up[:, :, :7], w_down, topk_weights, topk_ids), ValueError,
         r"w_gate_up must have shape \(E, 2I, 40\)"),
        ((x, w_gate_up, w_down[:, :, :5], topk_weights, topk_ids), ValueError,
         r"w_down must have shape \(8, 40, 24\)"),
        ((x, w_gate_up.half(), w_down, topk_weights, topk_ids), TypeError,
         r"w_gate_up must have x's dtype torch.float32"),
        ((x.double(), w_gate_up.double(), w_down.double(), topk_weights, topk_ids), TypeError,
         r"x must be float32, float16 or bfloat16"),
        ((x, w_gate_up, w_down, topk_weights[:, :1], topk_ids), ValueError,
         r"topk_weights and topk_ids must both have shape \(5, top_k\)"),
        ((x, w_gate_up, w_down, topk_weights, topk_ids.float()), TypeError,
         r"topk_ids must be int32 or int64"),
        ((x, w_gate_up.to("meta"), w_down, topk_weights, topk_ids), ValueError,
         r"w_gate_up is on meta but x is on cpu"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            layer(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 512, 4096])
def test_bf16_real_shapes_on_gpu(num_tokens, generator):
    """Qwen3-30B-A3B layer shapes in bf16: ours within 2x plain PyTorch bf16's error."""
    inputs = layer_inputs(num_tokens, 128, 8, generator, torch.bfloat16, dead=0.0,
                          hidden=2048, intermediate=768)
    inputs = [t.cuda() for t in inputs]
    assert_within_plain_budget(ops.fused_moe, inputs[:4], inputs[4], generator)
