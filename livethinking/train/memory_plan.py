"""Per-rank memory of an RFT or GRPO run, from its config and the model's ``config.json``
alone (the model is built on the meta device: no weights, no tokenizer), with a verdict
and the cheapest change that makes it fit.

Components (bytes per rank; P parameters, N ranks sharded by FSDP2 when N > 1, b the
training dtype's bytes: 2 on GPU (bf16), 4 on CPU):

- one process: ``parameters`` b·P, ``gradients`` b·P, ``fp32_masters`` 4·P (none when
  b = 4: the parameters are the masters), ``master_gradients`` 4·P at the optimizer step
  (``p.grad.float()``, bf16 only), ``adam_moments`` 8·P;
- N > 1 (FSDP2; bf16 as torchtitan, ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``): ``parameters`` 4·P/N (fp32 shards, which are the masters: no
  separate copy), ``gradients`` 4·P/N (reduce-scattered in fp32), ``adam_moments`` 8·P/N
  — 16 bytes per parameter over N — plus ``unsharded_layers`` 2·b·(largest decoder
  layer) (FSDP2 all-gathers one layer in bf16 and prefetches the next);
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
- ``reference_model`` b·P/N when ``loss.beta > 0`` (FSDP-sharded like the policy); with
  ``loss.reference_offload`` only what visits the device: b·(the parts outside the
  decoder layers + one layer) in one process, + a prefetched layer under FSDP2.

Peak = parameters + unsharded layers + gradients + masters + Adam + resident extras
(rollout copy, reference) + the largest of the phases: backward (activations + loss
workspace), the optimizer step (master gradients) and, when the engine frees its KV pool
while training (``rollout.free_cache_engine``), rollouts (the KV pool); otherwise the KV
pool is resident too. It fits when the peak is at most
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


def _parameter_counts(model_config) -> tuple[int, int, int, int]:
    """(all parameters, the largest decoder layer's, the embedding's, those outside the
    decoder layers), counted on meta."""
    from livethinking.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(model_config)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    return total, max(per_layer), model.model.embed_tokens.weight.numel(), \
        total - sum(per_layer)


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
    total, layer, _, outside = counts
    n, b = gpus, dtype_bytes
    mixed = n > 1 and b != 4  # FSDP2 mixed precision: the fp32 shards are the masters
    state_bytes = 4 if mixed else b
    ckpt = bool(getattr(config, "activation_checkpointing", False)
                or config.run.gradient_checkpointing)
    tokens = config.micro_batch_tokens if grpo else config.row_tokens
    kept, recomputed = activation_bytes_per_token(model_config, checkpointing=ckpt,
                                                  dtype_bytes=b)
    per_rank = {
        "parameters": state_bytes * total // n,
        "unsharded_layers": 2 * b * layer if n > 1 else 0,
        "gradients": state_bytes * total // n,
        "fp32_masters": 4 * total // n if state_bytes != 4 else 0,
        "adam_moments": 8 * total // n,
        "activations": int(tokens * (kept + recomputed)),
        "loss_workspace": tokens * model_config.hidden_size * b + CHUNK_BUFFERS,
        "master_gradients": 4 * total // n if state_bytes != 4 else 0,
    }
    if grpo:
        rollout = config.rollout
        colocated = layout == "colocated" and rollout.source == "engine"
        kv_per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads \
            * model_config.head_dim * b
        per_rank["kv_pool"] = rollout_kv_tokens(config, n) * kv_per_token if colocated else 0
        per_rank["rollout_copy"] = b * total if colocated and n > 1 else 0
        reference = 0
        if config.loss.beta > 0:
            reference = b * (outside + layer * (2 if n > 1 else 1)) \
                if config.loss.reference_offload else b * total // n
        per_rank["reference_model"] = reference
    free_kv = grpo and colocated and config.rollout.free_cache_engine
    peak = _peak(per_rank, free_kv=free_kv)
    usable = int(USABLE_FRACTION * gpu_memory)
    settings = {"algorithm": "grpo" if grpo else "rft", "gpus": n, "layout": layout,
                "parameters": total, "micro_batch_tokens": tokens,
                "activation_checkpointing": ckpt, "dtype_bytes": b,
                "mixed_precision": mixed}
    if grpo:
        settings |= {"reference_offload": config.loss.reference_offload,
                     "free_cache_engine": colocated and rollout.free_cache_engine}
    fits = peak <= usable
    return MemoryPlan(per_rank, peak, gpu_memory, usable, fits,
                      "none needed" if fits else "", settings)


def _peak(per_rank: dict[str, int], *, free_kv: bool) -> int:
    phases = {"step": per_rank["master_gradients"],
              "backward": per_rank["activations"] + per_rank["loss_workspace"]}
    if free_kv:
        phases["rollout"] = per_rank.get("kv_pool", 0)
    resident = sum(v for k, v in per_rank.items()
                   if k not in ("master_gradients", "activations", "loss_workspace")
                   and not (free_kv and k == "kv_pool"))
    return resident + max(phases.values())


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
        if layout == "colocated" and config.rollout.source == "engine" \
                and not config.rollout.free_cache_engine:
            candidates.append(("set rollout.free_cache_engine: true (the KV pool is freed "
                               "while training)",
                               lambda st: st | {"config": dataclasses.replace(
                                   st["config"], rollout=dataclasses.replace(
                                       st["config"].rollout, free_cache_engine=True))}))
        if config.loss.beta > 0 and not config.loss.reference_offload:
            candidates.append(("set loss.reference_offload: true (the reference model in "
                               "CPU memory)",
                               lambda st: st | {"config": dataclasses.replace(
                                   st["config"], loss=dataclasses.replace(
                                       st["config"].loss, reference_offload=True))}))
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
