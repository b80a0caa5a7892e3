"""One SFT step on packed rows: response-token NLL through ``fused_linear_logprobs``
(no N×V logits) plus the MoE load-balancing loss.

loss = −Σ_{response tokens} log p(token) / (response tokens in the step)
       + (1 / rows) Σ_rows router_aux_loss_coef · aux(row)
aux(row) counts the row's loss positions only (``loss_mask``: no prompt, no padding), as
transformers' ``load_balancing_loss_func`` does with an attention mask. Each row is
forwarded and backpropagated on its own (gradient accumulation), so memory holds one
row's activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from livethinking import ops
from livethinking.train.packing import PackedRow

__all__ = ["sft_step"]


def sft_step(model, rows: list[PackedRow], device: torch.device, *, aux_loss: bool = True,
             total_tokens: int | None = None, total_rows: int | None = None,
             world_size: int = 1, filler_rows: Sequence[PackedRow] = ()) -> dict[str, float]:
    """Accumulate gradients of the step's loss over ``rows``; returns its statistics.

    Under data parallelism each rank passes its own rows plus the step's totals over all
    ranks (``total_tokens`` response tokens, ``total_rows``) and ``world_size``: FSDP
    averages gradients over ranks, so each rank's loss is scaled by the world size.
    ``filler_rows`` are forwarded and backpropagated with weight 0 after the real rows (no
    gradient, no stats): a rank with fewer rows than the others runs them so that every
    rank makes the same number of FSDP forwards and backwards.
    """
    tokens = max(1, total_tokens if total_tokens is not None
                 else sum(r.num_loss_tokens for r in rows))
    num_rows = max(1, total_rows if total_rows is not None else len(rows))
    nll_sum, aux_sum = 0.0, 0.0
    for index, row in enumerate([*rows, *filler_rows]):
        row_weight = 1.0 if index < len(rows) else 0.0  # 0: a filler row
        mask = row.loss_mask.to(device)
        targets = row.targets.to(device)[mask]

        def head(hidden, weight):  # hidden (1, T, H) -> log-probs of the response tokens
            return ops.fused_linear_logprobs(hidden[0][mask], weight, targets)

        out = model.forward_hidden(row.input_ids[None].to(device),
                                   cu_seqlens=row.cu_seqlens.to(device), head=head,
                                   token_mask=mask[None])
        logp = out.head_output
        loss = -logp.sum() / tokens
        if aux_loss and out.weighted_aux_loss is not None:
            loss = loss + out.weighted_aux_loss / num_rows
            aux_sum += row_weight * float(out.aux_loss.detach())
        (loss * (world_size * row_weight)).backward()
        nll_sum += row_weight * float(-logp.detach().sum())
    return {"loss": nll_sum / tokens, "aux_loss": aux_sum / num_rows,
            "tokens": float(sum(r.num_loss_tokens for r in rows))}
