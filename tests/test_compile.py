"""The routing ops under torch.compile: fake kernels, dynamic shapes, autograd."""

import pytest
import torch

from livethinking.ops import moe_align, moe_permute, moe_topk_softmax, moe_unpermute


def routed_layer(x, router, expert_scale, block_size: int):
    """A toy MoE layer: route, gather by expert, scale per expert, combine."""
    weights, ids = moe_topk_softmax(x @ router, 2)
    alignment = moe_align(ids, router.shape[1], block_size)
    rows = moe_permute(x, alignment)
    experts = alignment.block_experts.repeat_interleave(block_size).clamp(min=0).long()
    rows = rows * expert_scale[experts][:, None]
    return moe_unpermute(rows, alignment, weights)


@pytest.mark.parametrize("block_size", [1, 16])
def test_compiled_forward_and_backward_match_eager(block_size, generator):
    router = torch.randn(12, 6, generator=generator)
    scale = torch.randn(6, generator=generator)
    compiled = torch.compile(routed_layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for num_tokens in (5, 23):  # a second size reuses the dynamic graph
        x = torch.randn(num_tokens, 12, generator=generator)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        r_eager, r_compiled = router.clone().requires_grad_(), router.clone().requires_grad_()
        eager = routed_layer(x_eager, r_eager, scale, block_size)
        out = compiled(x_compiled, r_compiled, scale, block_size)
        assert torch.equal(out, eager)
        upstream = torch.randn(out.shape, generator=generator)
        eager.backward(upstream)
        out.backward(upstream)
        assert torch.equal(x_compiled.grad, x_eager.grad)
        assert torch.equal(r_compiled.grad, r_eager.grad)
