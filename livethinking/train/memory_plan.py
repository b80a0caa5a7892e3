"""Per-rank memory of an RFT or GRPO run, from its config and the model's ``config.json``
alone (the model is built on the meta device: no weights, no tokenizer), with a verdict
and the cheapest change that makes it fit.

Components (bytes per rank; P parameters, N ranks sharded by FSDP2 when N > 1, b the
training dtype's bytes: 2 on GPU (bf16), 4 on CPU):

- ``parameters`` b·P/N, plus ``unsharded_layers`` 2·b·(largest decoder layer) when N > 1
  (FSDP2 all-gathers one layer and prefetches the next);
- ``gradients`` b·P/N; ``fp32_masters`` 4·P/N (none when b = 4: the parameters are the
  masters); ``master_gradients`` 4·P/N at the optimizer step (``p.grad.float()``, bf16
  only); ``adam_moments`` 8·P/N;
- ``activations``: what autograd keeps for backward over one microbatch of T tokens
  (GRPO: ``micro_batch_tokens``; RFT: one packed row of ``row_tokens``). Per token and
  decoder layer, from this code's saved tensors (bf16; exact on the CPU path, where it
  is measured in tests): attention 16H + 10·q + 10·kv + 8·heads + 4·kv_heads (q = heads ×
  head_dim, kv = kv_heads × head_dim), plus a dense MLP 8·I + 8 or an MoE block 10·E +
  4·k·H + 8·k·I + 32·k + 12 (the router's logits and fp32 softmax, the dispatched rows,
  the experts' gate/up/SiLU products); outside the layers 6H + 12.
  ``activation_checkpointing`` keeps 2H per token and layer (each layer's input; + 4E for
  an MoE layer: its router's fp32 softmax, which the balance loss keeps) and recomputes
  one layer at a time, whose full activations add once. Scaled by b/2.
- ``loss_workspace``: the gathered completion hidden states (T·H·b) and the fused
  log-prob op's fp32 chunk buffers (3 × 16 MiB, its CPU path's; the Triton path needs
  less, unmeasured);
- GRPO colocated only: ``kv_pool``, the KV cache for one rollout batch of this rank
  (`rollout_kv_tokens`: prompts_per_step / N prompts × group_size sequences ×
  (rollout.prompt_tokens + max_tokens) tokens × 2·layers·kv_heads·head_dim·b; on CUDA
  the trainer sizes its engine's pool to exactly that); ``rollout_copy`` b·P when N > 1
  (each rank's engine holds a full unsharded copy of the policy; none with one process:
  it shares the policy's tensors);
- ``reference_model`` b·P/N when ``loss.beta > 0`` (FSDP-sharded like the policy).

Peak = parameters + unsharded layers + gradients + masters + Adam + resident extras (KV
pool, rollout copy, reference) + max(activations + loss workspace, master gradients):
the backward and the optimizer step do not overlap. It fits when the peak is at most
``USABLE_FRACTION`` (0.92: CUDA context, NCCL buffers and allocator fragmentation take
the rest) of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

__all__ = ["MemoryPlan", "activation_bytes_per_token", "plan_memory", "rollout_kv_tokens"]

GiB = 1024**3
USABLE_FRACTION = 0.92
CHUNK_BUFFERS = 3 * (16 << 20)


@dataclass(slots=True)
class MemoryPlan:
    """A plan's figures (bytes per rank) and its verdict."""

    per_rank: dict[str, int]
    total_per_rank: int
    gpu_memory: int
    usable: int
    fits: bool
    suggestion: str
    settings: dict = field(default_factory=dict)

    @property
    def short_by(self) -> int:
        return max(0, self.total_per_rank - self.usable)

    def as_dict(self) -> dict:
        return {"per_rank": dict(self.per_rank), "total_per_rank": self.total_per_rank,
                "gpu_memory": self.gpu_memory, "usable": self.usable, "fits": self.fits,
                "short_by": self.short_by, "suggestion": self.suggestion,
                "settings": dict(self.settings)}

    def table(self) -> str:
        lines = [f"{'component':<20} {'GiB per rank':>13}"]
        for name, value in self.per_rank.items():
            lines.append(f"{name:<20} {value / GiB:>13.2f}")
        lines.append(f"{'peak':<20} {self.total_per_rank / GiB:>13.2f}")
        verdict = (f"fits: {self.total_per_rank / GiB:.1f} of {self.usable / GiB:.1f} GiB usable"
                   if self.fits else f"does not fit: short by {self.short_by / GiB:.1f} GiB "
                   f"({self.total_per_rank / GiB:.1f} > {self.usable / GiB:.1f} GiB usable)")
        return "\n".join(lines + [verdict, f"suggestion: {self.suggestion}"])


def rollout_kv_tokens(config, world_size: int) -> int:
    """Tokens of KV cache one rollout batch of a rank needs: its prompts (prompts_per_step
    / world) × group_size sequences × (rollout.prompt_tokens + rollout.max_tokens)."""
    rollout = config.rollout
    sequences = max(1, config.prompts_per_step // world_size) * rollout.group_size
    return sequences * (rollout.prompt_tokens + rollout.max_tokens)


def _layer_counts(model_config) -> tuple[int, int]:
    moe = sum(model_config.is_moe_layer(i) for i in range(model_config.num_hidden_layers))
    return moe, model_config.num_hidden_layers - moe


def activation_bytes_per_token(model_config, *, checkpointing: bool,
                               dtype_bytes: int = 2) -> tuple[float, float]:
    """(bytes per token kept for backward by the whole model, bytes per token of the one
    recomputed layer under checkpointing (0 without)), in the training dtype (module doc)."""
    c = model_config
    H, d, heads, kv_heads = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    attention = 16 * H + 10 * heads * d + 10 * kv_heads * d + 8 * heads + 4 * kv_heads
    k = c.num_experts_per_tok
    moe_layer = attention + 10 * c.num_experts + 4 * k * H + 8 * k * c.moe_intermediate_size \
        + 32 * k + 12
    dense_layer = attention + 8 * c.intermediate_size + 8
    moe, dense = _layer_counts(c)
    outside = 6 * H + 12
    scale = dtype_bytes / 2
    if not checkpointing:
        return scale * (moe * moe_layer + dense * dense_layer + outside), 0.0
    # each layer's input, and an MoE layer's router logits as the balance loss keeps them
    kept = (moe + dense) * 2 * H + moe * 4 * c.num_experts + outside
    return scale * kept, scale * (moe_layer if moe else dense_layer)


def _parameter_counts(model_config) -> tuple[int, int, int]:
    """(all parameters, the largest decoder layer's, the embedding's), counted on meta."""
    from livethinking.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(model_config)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    return total, layer, model.model.embed_tokens.weight.numel()


def plan_memory(config, model_config, *, gpus: int, gpu_memory: int,
                layout: str = "colocated", dtype_bytes: int = 2) -> MemoryPlan:
    """The per-rank plan of ``config`` (an ``RFTConfig`` or ``GRPOConfig``) for
    ``model_config`` on ``gpus`` GPUs of ``gpu_memory`` bytes (module docstring)."""
    if gpus < 1 or gpu_memory <= 0:
        raise ValueError(f"gpus must be >= 1 and gpu_memory > 0, got {gpus}, {gpu_memory}")
    if layout not in ("colocated", "disaggregated"):
        raise ValueError(f"layout must be colocated or disaggregated, got {layout!r}")
    counts = _parameter_counts(model_config)
    plan = _plan(config, model_config, counts, gpus=gpus, gpu_memory=gpu_memory,
                 layout=layout, dtype_bytes=dtype_bytes)
    if not plan.fits:
        plan.suggestion = _suggest(config, model_config, counts, gpus=gpus,
                                   gpu_memory=gpu_memory, layout=layout,
                                   dtype_bytes=dtype_bytes)
    return plan


def _plan(config, model_config, counts, *, gpus, gpu_memory, layout, dtype_bytes
          ) -> MemoryPlan:
    grpo = hasattr(config, "rollout")
    total, layer, _ = counts
    n, b = gpus, dtype_bytes
    ckpt = bool(getattr(config, "activation_checkpointing", False)
                or config.run.gradient_checkpointing)
    tokens = config.micro_batch_tokens if grpo else config.row_tokens
    kept, recomputed = activation_bytes_per_token(model_config, checkpointing=ckpt,
                                                  dtype_bytes=b)
    per_rank = {
        "parameters": b * total // n,
        "unsharded_layers": 2 * b * layer if n > 1 else 0,
        "gradients": b * total // n,
        "fp32_masters": 4 * total // n if b != 4 else 0,
        "adam_moments": 8 * total // n,
        "activations": int(tokens * (kept + recomputed)),
        "loss_workspace": tokens * model_config.hidden_size * b + CHUNK_BUFFERS,
        "master_gradients": 4 * total // n if b != 4 else 0,
    }
    if grpo:
        rollout = config.rollout
        colocated = layout == "colocated" and rollout.source == "engine"
        kv_per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads \
            * model_config.head_dim * b
        per_rank["kv_pool"] = rollout_kv_tokens(config, n) * kv_per_token if colocated else 0
        per_rank["rollout_copy"] = b * total if colocated and n > 1 else 0
        per_rank["reference_model"] = b * total // n if config.loss.beta > 0 else 0
    peak = _peak(per_rank)
    usable = int(USABLE_FRACTION * gpu_memory)
    settings = {"algorithm": "grpo" if grpo else "rft", "gpus": n, "layout": layout,
                "parameters": total, "micro_batch_tokens": tokens,
                "activation_checkpointing": ckpt, "dtype_bytes": b}
    fits = peak <= usable
    return MemoryPlan(per_rank, peak, gpu_memory, usable, fits,
                      "none needed" if fits else "", settings)


def _peak(per_rank: dict[str, int]) -> int:
    step_only = per_rank["master_gradients"]
    backward_only = per_rank["activations"] + per_rank["loss_workspace"]
    resident = sum(v for k, v in per_rank.items()
                   if k not in ("master_gradients", "activations", "loss_workspace"))
    return resident + max(step_only, backward_only)


def _suggest(config, model_config, counts, *, gpus, gpu_memory, layout, dtype_bytes) -> str:
    """The changes, cheapest first and applied one after another (each kept only when it
    lowers the peak), after which the plan fits: activation checkpointing, a smaller
    microbatch (down to 1024 tokens), rollouts on separate GPUs, no reference model, more
    GPUs (doubling, up to 1024). A change is kept when it lowers the peak, or the sum of
    everything held when the peak is set by another phase."""
    grpo = hasattr(config, "rollout")
    state = {"config": config, "layout": layout, "gpus": gpus}

    def plan(st):
        return _plan(st["config"], model_config, counts, gpus=st["gpus"],
                     gpu_memory=gpu_memory, layout=st["layout"], dtype_bytes=dtype_bytes)

    candidates = []
    if not (getattr(config, "activation_checkpointing", False)
            or config.run.gradient_checkpointing):
        candidates.append(("set activation_checkpointing: true",
                           lambda st: st | {"config": dataclasses.replace(
                               st["config"], activation_checkpointing=True)}))
    if grpo:
        micro = config.micro_batch_tokens
        while micro > 1024:
            micro //= 2
            candidates.append((f"set micro_batch_tokens: {micro}",
                               lambda st, m=micro: st | {"config": dataclasses.replace(
                                   st["config"], micro_batch_tokens=m)}))
        if layout == "colocated" and config.rollout.source == "engine":
            candidates.append(("roll out on separate GPUs (rollout.source: servers, README "
                               "'Scale out'): no KV pool or rollout copy here",
                               lambda st: st | {"layout": "disaggregated"}))
        if config.loss.beta > 0:
            candidates.append(("set loss.beta: 0 (no reference model per rank)",
                               lambda st: st | {"config": dataclasses.replace(
                                   st["config"], loss=dataclasses.replace(
                                       st["config"].loss, beta=0.0))}))
    more = gpus
    while more < 1024:
        more *= 2
        candidates.append((f"use {more} GPUs", lambda st, g=more: st | {"gpus": g}))
    def cost(result):  # the peak first, then everything held (a change may pay off later)
        return result.total_per_rank, sum(result.per_rank.values())

    def apply(changes):
        st = {"config": config, "layout": layout, "gpus": gpus}
        for _, change in changes:
            st = change(st)
        return plan(st)

    def shown(changes):  # a later microbatch size or GPU count replaces an earlier one
        texts = []
        for text, _ in changes:
            kind = next((k for k in ("set micro_batch_tokens", "use ") if text.startswith(k)),
                        text)
            texts = [t for t in texts if not t.startswith(kind)] + [text]
        return "; ".join(texts)

    taken, best = [], cost(plan(state))
    for text, change in candidates:
        result = apply(taken + [(text, change)])
        if cost(result) < best:
            taken, best = taken + [(text, change)], cost(result)
        if result.fits:
            for item in list(reversed(taken)):  # drop what the rest does not need
                rest = [t for t in taken if t is not item]
                if apply(rest).fits:
                    taken = rest
            return shown(taken)
    return "does not fit even after: " + shown(taken)
