"""A token-local loss of log-probabilities straight from hidden states, its gradient taken
during the forward pass: three GEMMs, where a log-prob op and autograd need four.

For z_n = (h_n·Wᵀ + b)/τ, logp_n = z_n[target_n] − logsumexp(z_n) and a scalar loss
L(logp) that is *token-local* — ∂L/∂logp_n depends on logp_n alone (the GRPO family with
token-level importance ratios: L = Σ_n c_n·ℓ_n(logp_n) with c_n set by the mask and the
loss type) — the gradient ∂L/∂z_n = g_n·(onehot(target_n) − softmax(z_n)), g_n = ∂L/∂logp_n,
is known as soon as a chunk's logits are. Per chunk of rows (CPU, or fp64 anywhere):

    z = h Wᵀ / τ (+ b/τ)                         GEMM 1, into a reused (rows, V) buffer
    logp, entropy (for statistics)               from m = max z, p = exp(z − m) / Σ
    g = ∂L/∂logp on the chunk's rows             autograd through ``loss_fn`` (O(N) work)
    dz = g·(onehot − p)                          in place of p
    dh = dz W / τ                                GEMM 2
    dW += dzᵀ h / τ,  db += Σ dz / τ             GEMM 3

and the backward only scales dh, dW, db by the upstream gradient (Liger-Kernel's fused
losses do the same). ``fused_linear_logprobs`` cannot: its upstream gradient is unknown in
its forward, so its backward recomputes z (four GEMMs). What bounds this op: the three
N·H·V GEMMs (2·N·H·V FLOPs each) and ~6 elementwise passes over each chunk's logits; memory:
two (rows, V) buffers, dW (V, H) and dh (N, H) in fp32 (fp64) — no N×V tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from livethinking.ops.logprobs import CPU_CHUNK_BYTES, _compute_dtype

__all__ = ["fused_linear_token_loss"]


def fused_linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            loss_fn: Callable[[torch.Tensor], torch.Tensor], *,
                            bias: torch.Tensor | None = None, temperature: float = 1.0,
                            row_mask: torch.Tensor | None = None, chunk_rows: int | None = None):
    """(loss, logp, entropy): ``loss = loss_fn(logp)`` (a 0-d tensor), differentiable in
    hidden (N, H), weight (V, H) and bias (V,), with logp (N,) of ``targets`` and the
    entropy (N,), both detached, float32 (float64 for float64 inputs); rows where
    ``row_mask`` is False get logp = entropy = 0 and cost no GEMM work.

    ``loss_fn`` maps an (N,) log-prob tensor to the loss and must be token-local (see the
    module docstring): it is called once per chunk with that chunk's rows live (the others
    constant) to take g, then once on the final logp for the value. A loss that mixes
    tokens (sequence- or chunk-level importance ratios) gets wrong gradients here: use
    ``fused_linear_logprobs`` and autograd for those. Inputs are checked by the caller
    (``fused_linear_grpo_loss`` checks them as ``fused_linear_logprobs`` does).
    """
    vocab = weight.shape[0]
    rows = chunk_rows or max(1, CPU_CHUNK_BYTES // (4 * max(vocab, 1)))
    mask = row_mask if row_mask is not None else torch.ones(hidden.shape[0], dtype=torch.bool,
                                                            device=hidden.device)
    return _FusedLinearTokenLoss.apply(hidden, weight, bias, targets.long(), mask.bool(),
                                       float(temperature), rows, loss_fn)


def _chunk_gradient(loss_fn, base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
                    ) -> torch.Tensor:
    """∂ loss_fn / ∂ logp at ``rows`` (n,), the other rows held at ``base``'s values."""
    with torch.enable_grad():
        live = values.detach().requires_grad_()
        full = base.index_put((rows,), live)  # (N,), differentiable in live only
        (grad,) = torch.autograd.grad(loss_fn(full), live, allow_unused=True)
    return torch.zeros_like(values) if grad is None else grad


class _FusedLinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature, chunk_rows, loss_fn):
        num_rows, compute = hidden.shape[0], _compute_dtype(hidden)
        device, vocab = hidden.device, weight.shape[0]
        logp = torch.zeros(num_rows, dtype=compute, device=device)
        entropy = torch.zeros(num_rows, dtype=compute, device=device)
        weight_c = weight.to(compute)  # (V, H)
        bias_t = None if bias is None else bias.to(compute) / temperature
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros(hidden.shape, dtype=compute, device=device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=device) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=compute, device=device) if want_bias else None
        span = min(chunk_rows, num_rows)
        shifted = torch.empty(span, vocab, dtype=compute, device=device)  # z − max z
        probs = torch.empty_like(shifted)  # softmax, then dz in place
        # Each chunk is done in full before the next (logits, g, both gradient GEMMs): g
        # needs only that chunk's logp because the loss is token-local.
        for start in range(0, num_rows, chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, num_rows), device=device)
            rows = rows[mask[rows]]  # masked rows cost no GEMM work
            n = rows.numel()
            if n == 0:
                continue
            scaled_hidden = hidden[rows].to(compute) / temperature  # (n, H)
            z = torch.mm(scaled_hidden, weight_c.T, out=shifted[:n])  # GEMM 1: (n, V)
            if bias_t is not None:
                z += bias_t
            target_z = z.gather(1, targets[rows, None])[:, 0]
            top = z.max(dim=1, keepdim=True).values
            z.sub_(top)  # z − m
            p = torch.exp(z, out=probs[:n])
            total = p.sum(dim=1)  # Σ exp(z − m)
            p.div_(total[:, None])
            log_total = total.log()
            chunk_logp = target_z - top[:, 0] - log_total
            # H = −Σ p log p = log Σ − Σ p (z − m), the dot row by row (no (n, V) temporary)
            entropy[rows] = log_total - torch.bmm(p[:, None, :], z[:, :, None]).flatten()
            logp[rows] = chunk_logp
            g = _chunk_gradient(loss_fn, logp, rows, chunk_logp).to(compute)  # (n,)
            dz = p.mul_(-g[:, None])  # dz = g (onehot − p)
            dz[torch.arange(n, device=device), targets[rows]] += g
            if grad_hidden is not None:  # GEMM 2: dh = dz W / τ
                grad_hidden[rows] = torch.mm(dz, weight_c).div_(temperature)
            if grad_weight is not None:  # GEMM 3: dW += dzᵀ h / τ
                grad_weight.addmm_(dz.T, scaled_hidden)
            if grad_bias is not None:
                grad_bias += dz.sum(0) / temperature
        with torch.no_grad():
            loss = loss_fn(logp).detach()
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        saved = ctx.saved_tensors
        out = []
        for tensor, present, dtype in zip(saved, ctx.present, ctx.dtypes):
            if not present:
                out.append(None)
                continue
            scaled = tensor if bool(grad_loss == 1) else tensor * grad_loss.to(tensor.dtype)
            out.append(scaled.to(dtype))
        return out[0], out[1], out[2], None, None, None, None, None
