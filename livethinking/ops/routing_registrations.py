"""Fake (meta) kernels and autograd formulas of the ``torch.ops.livethinking`` routing ops,
and the fake kernels of ``paged_decode_attention`` and ``rms_norm`` (inference only: no
autograd formula).

Fake kernels give output shapes from input shapes alone (they work with symbolic
sizes under ``torch.compile``). Gradients, for a pair p = (t, j) routed to row r:

* permute   rows[r] = w[p] x[t]         → dx[t] = Σ_j w[t,j] drows[row(t,j)] = unpermute(drows, w)
                                           dw[t,j] = <x[t], drows[row(t,j)]>  = pair_dot(x, drows)
* unpermute out[t] = Σ_j w[t,j] y[row]  → dy[r] = w[p] dout[t]               = permute(dout, w)
                                           dw[t,j] = <dout[t], y[row(t,j)]>   = pair_dot(dout, y)
* topk_softmax, for the chosen experts S of a token with probabilities p:
    without renormalisation w_j = p_{i_j}:  dl = scatter_S(g ⊙ w) − p · <g, w>
    with renormalisation w = softmax(l_S):  dl_S = w ⊙ (g − <g, w>), 0 elsewhere.

Importing this module registers them; it is imported once by ``livethinking.ops``
when the compiled library is present.
"""

from __future__ import annotations

import torch

__all__: list[str] = []

_LIB = "livethinking::"


@torch.library.register_fake(_LIB + "moe_topk_softmax")
def _topk_softmax_fake(router_logits, top_k, renormalize=True):
    num_tokens = router_logits.shape[0]
    return (router_logits.new_empty((num_tokens, top_k), dtype=torch.float32),
            router_logits.new_empty((num_tokens, top_k), dtype=torch.int32))


@torch.library.register_fake(_LIB + "paged_decode_attention")
def _paged_decode_attention_fake(q, k_pool, v_pool, block_tables, context_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake(_LIB + "rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(_LIB + "moe_align")
def _align_fake(topk_ids, num_experts, block_size):
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    used = torch.sym_min(num_pairs, num_experts)
    max_blocks = (num_pairs + used * (block_size - 1)) // block_size
    index = lambda *shape: topk_ids.new_empty(shape, dtype=torch.int32)  # noqa: E731
    return (index(max_blocks * block_size), index(num_experts + 1), index(max_blocks), index(1),
            index(num_tokens, top_k), index(num_experts))


@torch.library.register_fake(_LIB + "moe_permute")
def _permute_fake(x, sorted_ids, row_of_pair, topk_weights=None):
    return x.new_empty((sorted_ids.shape[0], x.shape[1]))


@torch.library.register_fake(_LIB + "moe_unpermute")
def _unpermute_fake(y, sorted_ids, row_of_pair, topk_weights=None):
    return y.new_empty((row_of_pair.shape[0], y.shape[1]))


@torch.library.register_fake(_LIB + "moe_pair_dot")
def _pair_dot_fake(a, b, row_of_pair):
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.new_empty((a.shape[0], row_of_pair.shape[1]), dtype=dtype)


# --------------------------------------------------------------------------- autograd


def _topk_softmax_setup(ctx, inputs, output):
    router_logits, _, renormalize = inputs
    topk_weights, topk_ids = output
    ctx.renormalize = renormalize
    ctx.logits_dtype = router_logits.dtype
    ctx.save_for_backward(router_logits, topk_weights, topk_ids)
    ctx.mark_non_differentiable(topk_ids)


def _topk_softmax_backward(ctx, grad_weights, _grad_ids):
    router_logits, topk_weights, topk_ids = ctx.saved_tensors
    g = grad_weights.float()  # (tokens, k)
    ids = topk_ids.long()
    inner = (g * topk_weights).sum(dim=-1, keepdim=True)  # (tokens, 1)
    grad_logits = torch.zeros(router_logits.shape, dtype=torch.float32, device=router_logits.device)
    if ctx.renormalize:
        grad_logits.scatter_(1, ids, topk_weights * (g - inner))
    else:
        probs = torch.softmax(router_logits.float(), dim=-1)
        grad_logits.scatter_(1, ids, g * topk_weights)
        grad_logits -= probs * inner
    return grad_logits.to(ctx.logits_dtype), None, None


def _routing_setup(ctx, inputs, output):
    """Both permute and unpermute take (data, sorted_ids, row_of_pair, topk_weights)."""
    data, sorted_ids, row_of_pair, topk_weights = inputs
    ctx.has_weights = topk_weights is not None
    ctx.save_for_backward(data, sorted_ids, row_of_pair, topk_weights)


def _permute_backward(ctx, grad_rows):
    x, sorted_ids, row_of_pair, topk_weights = ctx.saved_tensors
    grad_rows = grad_rows.contiguous()
    grad_x = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.livethinking.moe_unpermute(grad_rows, sorted_ids, row_of_pair,
                                                      topk_weights)
    if ctx.has_weights and ctx.needs_input_grad[3]:
        grad_weights = torch.ops.livethinking.moe_pair_dot(x, grad_rows, row_of_pair)
    return grad_x, None, None, grad_weights


def _unpermute_backward(ctx, grad_out):
    y, sorted_ids, row_of_pair, topk_weights = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_y = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_y = torch.ops.livethinking.moe_permute(grad_out, sorted_ids, row_of_pair, topk_weights)
    if ctx.has_weights and ctx.needs_input_grad[3]:
        grad_weights = torch.ops.livethinking.moe_pair_dot(grad_out, y, row_of_pair)
    return grad_y, None, None, grad_weights


torch.library.register_autograd(_LIB + "moe_topk_softmax", _topk_softmax_backward,
                                setup_context=_topk_softmax_setup)
torch.library.register_autograd(_LIB + "moe_permute", _permute_backward,
                                setup_context=_routing_setup)
torch.library.register_autograd(_LIB + "moe_unpermute", _unpermute_backward,
                                setup_context=_routing_setup)
