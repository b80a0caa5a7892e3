"""Log-probabilities of target tokens straight from hidden states: no N×V logits kept.

    z = (hidden · weightᵀ + bias) / temperature,   logp[n] = z[n, target[n]] − logsumexp(z[n])
    entropy[n] = −Σ_v softmax(z[n])_v · log softmax(z[n])_v

CUDA runs the Triton kernels of ``livethinking.kernels.fused_linear_logprobs`` (online
log-sum-exp over vocabulary tiles). CPU — and float64 on CUDA, which Triton's tl.dot
cannot compile for — runs the same math over chunks of rows in PyTorch: at most
``chunk_rows × V`` fp32 (fp64) logits exist at a time, in the forward and in the
backward (which recomputes them), so peak memory is flat in N. What bounds the CPU path:
four N·H·V GEMMs for forward + backward (the forward's logits, their recomputation, dh,
dW) — the upstream gradient of log-probs is unknown in the forward. A scalar loss that is
token-local needs only three: ``livethinking.ops.fused_token_loss`` (which
``fused_linear_grpo_loss`` uses on CPU).
"""

from __future__ import annotations

import torch

from livethinking.kernels import fused_linear_logprobs as triton_logprobs

__all__ = ["fused_linear_logprobs"]

CPU_CHUNK_BYTES = 16 << 20  # fp32 logits per chunk on the CPU path (a few such buffers live)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          return_entropy: bool = False, row_mask: torch.Tensor | None = None,
                          chunk_rows: int | None = None):
    """logp (N,) float32 of ``targets`` under softmax((hidden·weightᵀ + bias) / temperature)
    [and its entropy (N,) float32] (float64 for float64 inputs). Differentiable in hidden,
    weight and bias for upstream gradients on both outputs; rows where ``row_mask`` is
    False give 0 and cost no GEMM work (on CUDA, except in the d hidden product: cuBLAS
    over their zero dZ rows). This is also the SFT cross-entropy: loss = −mean(logp over
    response tokens).
    """
    _check(hidden, weight, targets, bias, temperature, row_mask)
    if hidden.is_cuda and hidden.dtype != torch.float64:
        return triton_logprobs.fused_linear_logprobs(hidden, weight, targets, bias=bias,
                                                     temperature=temperature,
                                                     return_entropy=return_entropy,
                                                     row_mask=row_mask)
    vocab = weight.shape[0]
    rows = chunk_rows or max(1, CPU_CHUNK_BYTES // (4 * max(vocab, 1)))
    mask = row_mask if row_mask is not None else torch.ones(hidden.shape[0], dtype=torch.bool,
                                                            device=hidden.device)
    logp, entropy = _ChunkedLinearLogprobs.apply(hidden, weight, bias, targets.long(), mask.bool(),
                                                 float(temperature), rows, return_entropy)
    return (logp, entropy) if return_entropy else logp


def _check(hidden, weight, targets, bias, temperature, row_mask) -> None:
    for name, t, ndim, doc in (("hidden", hidden, 2, "(N, H)"), ("weight", weight, 2, "(V, H)"),
                               ("targets", targets, 1, "(N,)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {doc}, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {doc}, got shape {tuple(t.shape)}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[1]}) to match hidden, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or not hidden.is_floating_point():
        raise TypeError(f"hidden and weight must share a floating dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
    if hidden.is_cuda:  # checked on the device: no host synchronisation
        torch._assert_async(((targets >= 0) & (targets < weight.shape[0])).all(),
                            "targets must lie in [0, V)")
    elif targets.numel() and (targets.min() < 0 or targets.max() >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, V={weight.shape[0]}), got values in "
                         f"[{targets.min().item()}, {targets.max().item()}]")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) on {hidden.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if row_mask is not None and (row_mask.shape != (hidden.shape[0],) or row_mask.device != hidden.device):
        raise ValueError(f"row_mask must have shape ({hidden.shape[0]},) on {hidden.device}, got "
                         f"{tuple(row_mask.shape)} on {row_mask.device}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """z = (h/τ) Wᵀ + b/τ chunk by chunk into one reused (chunk, V) buffer (no page faults,
    no N×V); the backward recomputes z and turns it into dz in place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature, chunk_rows, want_entropy):
        num_rows, compute = hidden.shape[0], _compute_dtype(hidden)
        device = hidden.device
        logp = torch.zeros(num_rows, dtype=compute, device=device)
        entropy = torch.zeros(num_rows, dtype=compute, device=device)
        lse = torch.zeros(num_rows, dtype=compute, device=device)
        weight_t = weight.to(compute).T  # (H, V)
        bias_t = None if bias is None else bias.to(compute) / temperature
        logits = torch.empty(min(chunk_rows, num_rows), weight.shape[0], dtype=compute,
                             device=device)
        probs = torch.empty_like(logits) if want_entropy else None
        for start in range(0, num_rows, chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, num_rows), device=device)
            rows = rows[mask[rows]]  # masked rows cost no GEMM work
            if rows.numel() == 0:
                continue
            z = torch.mm(hidden[rows].to(compute) / temperature, weight_t, out=logits[: rows.numel()])
            if bias_t is not None:
                z += bias_t
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[rows] = chunk_lse
            logp[rows] = z.gather(1, targets[rows, None]).squeeze(1) - chunk_lse
            if want_entropy:  # H = lse − Σ p z, the dot product row by row (no (rows, V) temporary)
                p = torch.sub(z, chunk_lse[:, None], out=probs[: rows.numel()]).exp_()
                entropy[rows] = chunk_lse - torch.bmm(p[:, None, :], z[:, :, None]).flatten()
        ctx.temperature, ctx.chunk_rows, ctx.has_bias = temperature, chunk_rows, bias is not None
        ctx.save_for_backward(hidden, weight, bias, targets, mask, lse, entropy)
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, mask, lse, entropy = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        num_rows, compute = hidden.shape[0], _compute_dtype(hidden)
        weight_c = weight.to(compute)  # (V, H)
        bias_t = None if bias is None else bias.to(compute) / temperature
        device = hidden.device
        grad_hidden = torch.zeros(hidden.shape, dtype=compute, device=device)
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=device)  # fp32/fp64 acc.
        grad_bias = (torch.zeros(weight.shape[0], dtype=compute, device=device)
                     if ctx.has_bias else None)
        zeros = torch.zeros(num_rows, dtype=compute, device=device)
        g = zeros if grad_logp is None else grad_logp.to(compute)
        e = None if grad_entropy is None else grad_entropy.to(compute)
        buffer = torch.empty(min(chunk_rows, num_rows), weight.shape[0], dtype=compute,
                             device=device)
        log_probs = torch.empty_like(buffer) if e is not None else None
        for start in range(0, num_rows, chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, num_rows), device=device)
            rows = rows[mask[rows]]
            n = rows.numel()
            if n == 0:
                continue
            scaled_hidden = hidden[rows].to(compute) / temperature
            z = torch.mm(scaled_hidden, weight_c.T, out=buffer[:n])
            if bias_t is not None:
                z += bias_t
            # dz = g (onehot − p) + e ∂H/∂z, with ∂H/∂z = −p (log p + H)
            if e is None:
                grad = z.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
            else:
                logp = torch.sub(z, lse[rows, None], out=log_probs[:n])
                p = torch.exp(logp, out=z)
                grad = logp.add_(entropy[rows, None]).mul_(e[rows, None]).add_(g[rows, None])
                grad.mul_(p).neg_()
            grad[torch.arange(n, device=device), targets[rows]] += g[rows]
            # z = (h Wᵀ + b) / τ:  dh = dz W / τ,  dW = dzᵀ (h / τ),  db = Σ dz / τ
            grad_hidden[rows] = torch.mm(grad, weight_c) / temperature
            grad_weight.addmm_(grad.T, scaled_hidden)
            if grad_bias is not None:
                grad_bias += grad.sum(0) / temperature
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None,
                None)
