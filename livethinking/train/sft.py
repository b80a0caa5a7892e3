"""One SFT step on packed rows: response-token NLL through ``fused_linear_logprobs``
(no N×V logits) plus the MoE load-balancing loss.

loss = −Σ_{response tokens} log p(token) / (response tokens in the step)
       + (1 / rows) Σ_rows router_aux_loss_coef · aux(row)
Each row is forwarded and backpropagated on its own (gradient accumulation), so memory
holds one row's activations.
"""

from __future__ import annotations

import torch

from livethinking import ops
from livethinking.train.packing import PackedRow

__all__ = ["sft_step"]


def sft_step(model, rows: list[PackedRow], device: torch.device, *, aux_loss: bool = True,
             token_count: int | None = None) -> dict[str, float]:
    """Accumulate gradients of the step's loss over ``rows``; returns its statistics.
    ``token_count`` overrides the normaliser (all ranks' response tokens, under FSDP)."""
    tokens = token_count if token_count is not None else sum(r.num_loss_tokens for r in rows)
    tokens = max(1, tokens)
    nll_sum, aux_sum = 0.0, 0.0
    weight = model.lm_head.weight
    for row in rows:
        out = model.forward_hidden(row.input_ids[None].to(device),
                                   cu_seqlens=row.cu_seqlens.to(device))
        mask = row.loss_mask.to(device)
        hidden = out.hidden_states[0][mask]  # (n, H)
        logp = ops.fused_linear_logprobs(hidden, weight, row.targets.to(device)[mask])
        loss = -logp.sum() / tokens
        if aux_loss and out.weighted_aux_loss is not None:
            loss = loss + out.weighted_aux_loss / len(rows)
            aux_sum += float(out.aux_loss.detach())
        loss.backward()
        nll_sum += float(-logp.detach().sum())
    return {"loss": nll_sum / tokens, "aux_loss": aux_sum / max(1, len(rows)),
            "tokens": float(sum(r.num_loss_tokens for r in rows))}
