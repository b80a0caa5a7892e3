"""The public op API of livethinking: validates arguments, then runs the compiled op.

Each op has a plain-PyTorch reference in :mod:`livethinking.ops.reference`.
"""

from livethinking import _extension
from livethinking.ops.dpo import dpo_loss
from livethinking.ops.grpo import fused_linear_grpo_loss, group_advantages
from livethinking.ops.logprobs import fused_linear_logprobs
from livethinking.ops.moe_layer import fused_moe
from livethinking.ops.paged_attention import paged_decode_attention
from livethinking.ops.rollout_correction import CorrectionStats, rollout_correction
from livethinking.ops.routing import (
    MoeAlignment,
    moe_align,
    moe_permute,
    moe_topk_softmax,
    moe_unpermute,
)

if _extension.compiled_library is not None:
    from livethinking.ops import routing_registrations  # noqa: F401  (registers fakes, autograd)

__all__ = [
    "CorrectionStats",
    "MoeAlignment",
    "dpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "fused_moe",
    "group_advantages",
    "moe_align",
    "moe_permute",
    "moe_topk_softmax",
    "moe_unpermute",
    "paged_decode_attention",
    "rollout_correction",
]
