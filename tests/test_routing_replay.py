"""Routing replay in the model: a forward given the experts to use (the engine's, R3; the
old policy's, R2) uses exactly those, weighted by the router's softmax at them, so the
router still trains; the load-balancing loss keeps the router's own top-k."""

import pytest
import torch

from livethinking.model import CausalLM, ModelConfig
from livethinking.model.model import load_balancing_loss
from livethinking.model.layers import SparseMoeBlock


def _config(**kw):
    base = dict(model_type="qwen3_moe", vocab_size=97, hidden_size=32, intermediate_size=48,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=256, moe_intermediate_size=16, num_experts=16,
                num_experts_per_tok=4, norm_topk_prob=True, eos_token_id=1, pad_token_id=0)
    return ModelConfig(**(base | kw))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = CausalLM(_config(**kw)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _reference_block(x, gate, gate_up, down, ids, norm):
    """fp64, token by token: Σ_j w_j · down_e(silu(gate_e x) ⊙ up_e x), w = softmax(gate·x)
    at the given experts (renormalised when ``norm``)."""
    rows = []
    for t in range(x.shape[0]):
        probs = torch.softmax(gate @ x[t], dim=-1)
        w = probs[ids[t]]
        if norm:
            w = w / w.sum()
        out = torch.zeros_like(x[t])
        for j, e in enumerate(ids[t].tolist()):
            g, u = (gate_up[e] @ x[t]).chunk(2)
            out = out + w[j] * (down[e] @ (torch.nn.functional.silu(g) * u))
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_replayed_block_and_its_gradients_match_fp64(norm_topk_prob, tokens, generator):
    block = SparseMoeBlock(24, 12, 16, 4, norm_topk_prob).float()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
    x = torch.randn(tokens, 24, generator=generator)
    ids = torch.stack([torch.randperm(16, generator=generator)[:4] for _ in range(tokens)])
    upstream = torch.randn(tokens, 24, generator=generator)
    xr = x.clone().requires_grad_()
    out, logits, used = block(xr, ids)
    out.backward(upstream)
    assert torch.equal(used, ids.int()) and logits.shape == (tokens, 16)
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    ref_in = [t.detach().double().requires_grad_() for t in [x] + params]
    ref = _reference_block(*ref_in, ids, norm_topk_prob)
    ref.backward(upstream.double())
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=0, atol=2e-6 * scale)
    for name, ours, theirs in zip(["x", "router", "gate_up", "down"],
                                  [xr.grad] + [p.grad for p in params], ref_in):
        torch.testing.assert_close(ours.double(), theirs.grad, rtol=0,
                                   atol=2e-6 * float(theirs.grad.abs().max())), name
    assert block.gate.weight.grad.abs().sum() > 0  # the router trains under replay


def test_replaying_the_models_own_routes_changes_nothing(generator):
    model = _model()
    ids = torch.randint(2, 97, (2, 13), generator=generator)
    plain = model.forward_hidden(ids, return_routes=True)
    routes = plain.routed_experts
    assert routes.shape == (2, 13, 3, 4) and routes.dtype == torch.int32
    replayed = model.forward_hidden(ids, routed_experts=routes, return_routes=True)
    assert torch.equal(replayed.routed_experts, routes)
    assert torch.equal(replayed.hidden_states, plain.hidden_states)  # bit for bit
    assert torch.equal(replayed.aux_loss, plain.aux_loss)


def test_with_a_perturbed_router_replay_keeps_the_rollouts_experts(generator):
    """A simulated train–inference mismatch: the trainer's router differs. Without replay
    its routes differ from the rollout's; with replay every layer uses the rollout's, and
    the output is that of the rollout's experts under the trainer's router weights."""
    sampler = _model(seed=1)
    trainer = _model(seed=1)
    with torch.no_grad():
        for layer in trainer.model.layers:
            layer.mlp.gate.weight.add_(0.3 * torch.randn(layer.mlp.gate.weight.shape,
                                                         generator=generator))
    ids = torch.randint(2, 97, (1, 29), generator=generator)
    rollout_routes = sampler.forward_hidden(ids, return_routes=True).routed_experts
    free = trainer.forward_hidden(ids, return_routes=True)
    disagreement = (free.routed_experts.sort(-1).values
                    != rollout_routes.sort(-1).values).any(-1).float().mean()
    assert disagreement > 0.1  # the perturbation does move routing decisions
    replayed = trainer.forward_hidden(ids, routed_experts=rollout_routes, return_routes=True)
    assert torch.equal(replayed.routed_experts, rollout_routes)
    assert not torch.allclose(replayed.hidden_states, free.hidden_states, atol=1e-4)
    # the load-balancing loss still comes from the trainer router's own top-k
    assert torch.equal(replayed.aux_loss, load_balancing_loss(replayed.router_logits, 16, 4))
    # layer by layer: each MoE block's output under replay is the fp64 reference's
    captured = {}
    hooks = [layer.mlp.register_forward_hook(
        lambda m, args, out, i=i: captured.__setitem__(i, (args[0], out[0])))
        for i, layer in enumerate(trainer.model.layers)]
    trainer.forward_hidden(ids, routed_experts=rollout_routes)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(trainer.model.layers):
        x, out = captured[i]
        block = layer.mlp
        ref = _reference_block(x.reshape(-1, 32).double(), block.gate.weight.double(),
                               block.experts.gate_up_proj.double(),
                               block.experts.down_proj.double(), rollout_routes[0, :, i].long(),
                               True).detach()
        torch.testing.assert_close(out.detach().reshape(-1, 32).double(), ref, rtol=0,
                                   atol=2e-6 * float(ref.abs().max()))


def test_replay_under_gradient_checkpointing_gives_the_same_gradients(generator):
    model = _model(seed=2)
    ids = torch.randint(2, 97, (2, 9), generator=generator)
    routes = torch.randint(0, 16, (2, 9, 3, 4), generator=generator)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        model.gradient_checkpointing = checkpointing
        model.compute_logits(model.forward_hidden(ids, routed_experts=routes).hidden_states
                             ).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routes, fragment", [
    (torch.zeros(2, 5, 3, 3, dtype=torch.int32), r"\(tokens, MoE layers, top_k\)"),
    (torch.full((2, 5, 3, 4), 16), r"outside \[0, 16\)"),
    (torch.full((2, 5, 3, 4), -1), r"outside \[0, 16\)"),
    (torch.zeros(2, 5, 3, 4), "integer expert ids"),
])
def test_bad_routes_are_named(routes, fragment):
    model = _model()
    with pytest.raises(ValueError, match=fragment):
        model.forward_hidden(torch.ones(2, 5, dtype=torch.long), routed_experts=routes)


def test_a_dense_model_refuses_routes():
    model = _model(model_type="qwen3", num_experts=0)
    with pytest.raises(ValueError, match="no MoE layer"):
        model.forward_hidden(torch.ones(1, 3, dtype=torch.long),
                             routed_experts=torch.zeros(1, 3, 1, 4, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_through_the_triton_moe_on_cuda(dtype, generator):
    """On CUDA the replayed ids go straight into the Triton fused MoE (no top-k): a
    forward's own routes replay bit for bit, and a replayed block (forward and router
    gradient) stays within the dtype's budget of the fp64 reference."""
    model = _model(seed=3).cuda().to(dtype)
    ids = torch.randint(2, 97, (2, 17), generator=generator).cuda()
    plain = model.forward_hidden(ids, return_routes=True)
    replayed = model.forward_hidden(ids, routed_experts=plain.routed_experts)
    assert torch.equal(replayed.hidden_states, plain.hidden_states)
    block = SparseMoeBlock(24, 12, 16, 4, True).cuda().to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).cuda() * 0.4)
    x = torch.randn(33, 24, generator=generator).cuda().to(dtype)
    routes = torch.stack([torch.randperm(16, generator=generator)[:4] for _ in range(33)])
    out, _, _ = block(x, routes.cuda())
    out.float().sum().backward()
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    ref_in = [t.detach().double().cpu().requires_grad_() for t in [x] + params]
    ref = _reference_block(*ref_in, routes, True)
    ref.sum().backward()
    budget = 2e-6 if dtype == torch.float32 else 3e-2
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(out.detach().double().cpu(), ref.detach(), rtol=0,
                               atol=budget * scale)
    grad = ref_in[1].grad
    torch.testing.assert_close(block.gate.weight.grad.double().cpu(), grad, rtol=0,
                               atol=budget * 4 * float(grad.abs().max()))
