"""Qwen3-MoE and dense Qwen3 causal language models on livethinking's ops.

Parameter names equal transformers' (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ``model.layers.{i}.mlp.gate.weight``,
``model.layers.{i}.mlp.experts.gate_up_proj``, ``model.norm.weight``, ``lm_head.weight``,
...), so ``CausalLM(config).load_state_dict(hf_model.state_dict())`` works as is.

Mixed precision: weights and activations are in the model's dtype (bf16 on GPU); RMSNorm,
the rotary tables, the attention softmax (inside SDPA / flash-attn), the router softmax and
top-k (``moe_topk_softmax``), the expert accumulation (``fused_moe``) and the
load-balancing loss run in fp32. The router linear itself runs in the model dtype, as in
transformers and vLLM, so routing decisions match theirs.

Three forward modes, none of which schedules anything:
- :meth:`CausalLM.forward_hidden` — training; (B, T) rows, or one row of packed documents
  with ``cu_seqlens``; returns final hidden states, router logits and the aux loss;
- :meth:`CausalLM.forward_step` — inference through a caller-owned :class:`KVCache`;
- :meth:`CausalLM.forward` — logits for (B, T) ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from livethinking.model.attention import Attention, AttentionInputs, packed_causal_mask
from livethinking.model.config import ModelConfig
from livethinking.model.kv_cache import KVCache
from livethinking.model.layers import DenseMLP, RMSNorm, RotaryEmbedding, SparseMoeBlock
from livethinking.ops.linear import linear

__all__ = ["CausalLM", "DecoderLayer", "HiddenOutput", "Qwen3Model", "load_balancing_loss"]


@dataclass(slots=True)
class HiddenOutput:
    hidden_states: torch.Tensor  # (B, T, H), after the final norm
    router_logits: tuple[torch.Tensor, ...]  # one (B·T, E) per MoE layer
    aux_loss: torch.Tensor | None  # transformers' load_balancing_loss_func; None if dense
    router_aux_loss_coef: float = 0.0
    head_output: object = None  # what forward_hidden's ``head`` returned
    routed_experts: torch.Tensor | None = None  # (B, T, MoE layers, k) int32, when asked

    @property
    def weighted_aux_loss(self) -> torch.Tensor | None:
        """``router_aux_loss_coef · aux_loss``, the term added to the training loss."""
        return None if self.aux_loss is None else self.router_aux_loss_coef * self.aux_loss


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int,
                        top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss exactly as transformers computes it for Qwen3-MoE
    (``load_balancing_loss_func``, its ``attention_mask`` included).

    Over all layers' rows together, each row t weighted by m_t (``token_mask`` flattened to
    the (B·T,) rows of every layer; 1 everywhere when None): f_e = Σ_t m_t·[e in top-k(t)] /
    Σ_t m_t, P_e = Σ_t m_t·softmax(l_t)_e / Σ_t m_t; loss = E · Σ_e f_e · P_e (f_e is not
    divided by k, as in transformers). A row with m_t = 0 (padding, prompt) adds nothing;
    an all-zero mask gives 0 (transformers: NaN).
    """
    counts = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum = torch.zeros_like(counts)
    rows = counts.new_zeros(())
    weight = None
    if token_mask is not None:
        weight = token_mask.reshape(-1).to(device=counts.device, dtype=torch.float32)  # (B·T,)
        if weight.numel() != router_logits[0].shape[0]:
            raise ValueError(f"token_mask must have one entry per router row "
                             f"({router_logits[0].shape[0]}), got {tuple(token_mask.shape)}")
    for logits in router_logits:  # (B·T, E)
        probs = F.softmax(logits.float(), dim=-1)
        with torch.no_grad():
            picks = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)  # (B·T·k,)
            if weight is None:
                counts = counts + torch.bincount(picks, minlength=num_experts).float()
            else:
                counts = counts.scatter_add(0, picks, weight.repeat_interleave(top_k))
        if weight is None:
            prob_sum = prob_sum + probs.sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            prob_sum = prob_sum + (probs * weight[:, None]).sum(dim=0)
            rows = rows + weight.sum()
    rows = rows.clamp(min=1)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoeBlock(config.hidden_size, config.moe_intermediate_size,
                                      config.num_experts, config.num_experts_per_tok,
                                      config.norm_topk_prob)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs,
                replay_ids: torch.Tensor | None = None):
        """Returns the new hidden states, the router logits and the expert ids used (None,
        None for a dense layer); ``replay_ids`` (tokens, k): the experts to use instead of
        the router's top-k (routing replay)."""
        fast = inputs.kv_cache is not None  # the engine's steps: its inference kernels
        x = x + self.self_attn(self.input_layernorm(x, fast), inputs)
        h = self.post_attention_layernorm(x, fast)
        if self.is_moe:
            h, router_logits, ids = self.mlp(h, replay_ids, fast)
        else:
            h, router_logits, ids = self.mlp(h, fast), None, None
        return x + h, router_logits, ids


class Qwen3Model(nn.Module):
    """Embedding, decoder layers, final norm (transformers' ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    # ---------------------------------------------------------------- the layer stack
    def _run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor,
                    inputs: AttentionInputs, routed_experts: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Final hidden states, each MoE layer's router logits and expert ids (tokens, k);
        ``routed_experts`` (tokens, MoE layers, k): replay those experts."""
        x = self.model.embed_tokens(input_ids)
        inputs.cos, inputs.sin = self.model.rotary_emb(positions, x.dtype)
        router_logits, routes = [], []
        for layer in self.model.layers:
            replay = None
            if routed_experts is not None and layer.is_moe:
                replay = routed_experts[:, len(routes)]  # (tokens, k)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, logits, ids = checkpoint(layer, x, inputs, replay, use_reentrant=False)
            else:
                x, logits, ids = layer(x, inputs, replay)
            if logits is not None:
                router_logits.append(logits)
                routes.append(ids)
        return self.model.norm(x, inputs.kv_cache is not None), router_logits, routes

    def check_routes(self, routed_experts: torch.Tensor, tokens: int) -> torch.Tensor:
        """``routed_experts`` as (tokens, MoE layers, k) int32, or ValueError naming what
        is wrong (shape, or an id outside [0, num_experts))."""
        config = self.config
        layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        want = (tokens, layers, config.num_experts_per_tok)
        if layers == 0:
            raise ValueError("routed_experts given, but the model has no MoE layer")
        if routed_experts.dtype.is_floating_point or routed_experts.dtype == torch.bool:
            raise ValueError(f"routed_experts must hold integer expert ids, got "
                             f"{routed_experts.dtype}")
        if routed_experts.numel() != math.prod(want):
            raise ValueError(f"routed_experts must be (tokens, MoE layers, top_k) = {want} "
                             f"(or (B, T, ...)), got {tuple(routed_experts.shape)}")
        routes = routed_experts.reshape(want)
        if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= config.num_experts):
            raise ValueError(f"routed_experts holds ids outside [0, {config.num_experts}): "
                             f"{int(routes.min())}..{int(routes.max())}")
        return routes.to(torch.int32)

    def forward_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, head=None,
                       token_mask: torch.Tensor | None = None,
                       routed_experts: torch.Tensor | None = None,
                       return_routes: bool = False) -> HiddenOutput:
        """Training forward to the final hidden states (after the final norm).

        input_ids (B, T); position_ids (B, T), default 0..T-1 (restarting per document
        when ``cu_seqlens`` is given). ``cu_seqlens`` (docs + 1,) int, [0, ..., T]: B must
        be 1, the row holds several documents and attention never crosses them.
        ``head(hidden_states, lm_head_weight)``, when given, runs inside this call (so under
        FSDP the lm_head weight is unsharded for it) and its result is ``head_output``:
        the place for a fused loss on the hidden states. ``token_mask`` (B, T), when given,
        selects the positions the load-balancing loss counts (as transformers'
        ``attention_mask``): the trainers pass the loss positions, so padding and prompt
        tokens do not enter it. ``routed_experts`` (B, T, MoE layers, k) int: routing
        replay, every MoE layer uses these experts (the load-balancing loss still reads the
        router's own top-k); ``return_routes``: ``routed_experts`` of the output holds the
        experts used, the same shape.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        batch, steps = input_ids.shape
        inputs = AttentionInputs(cos=None, sin=None)
        if cu_seqlens is not None:
            cu_seqlens = _check_cu_seqlens(cu_seqlens, batch, steps)
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            inputs.cu_seqlens, inputs.max_seqlen = cu_seqlens, int(lengths.max())
            inputs.mask = packed_causal_mask(cu_seqlens, steps)
            if position_ids is None:
                starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
                position_ids = (torch.arange(steps, device=input_ids.device) - starts)[None]
        if position_ids is None:
            position_ids = torch.arange(steps, device=input_ids.device).expand(batch, steps)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        replay = None if routed_experts is None else self.check_routes(routed_experts,
                                                                       batch * steps)
        hidden, router_logits, routes = self._run_layers(input_ids, position_ids, inputs,
                                                         replay)
        aux = None
        if router_logits:
            if token_mask is not None and tuple(token_mask.shape) != (batch, steps):
                raise ValueError(f"token_mask must have input_ids' shape {(batch, steps)}, got "
                                 f"{tuple(token_mask.shape)}")
            aux = load_balancing_loss(tuple(router_logits), self.config.num_experts,
                                      self.config.num_experts_per_tok, token_mask)
        head_output = None if head is None else head(hidden, self.lm_head.weight)
        used = torch.stack(routes, 1).reshape(batch, steps, len(routes), -1) \
            if return_routes and routes else None
        return HiddenOutput(hidden, tuple(router_logits), aux, self.config.router_aux_loss_coef,
                            head_output, used)

    def compute_logits(self, hidden_states: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V) = hidden · lm_headᵀ; ``fast`` (the engine's
        steps): by ``ops.linear``'s skinny GEMM."""
        if not fast:
            return self.lm_head(hidden_states)
        return linear(hidden_states, self.lm_head.weight, self.lm_head.bias, fast=True)

    def forward_step_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
                            kv_cache: KVCache, return_routes: bool = False):
        """Inference: ids and positions (B, T) -> final hidden states (B, T, H); k/v go into
        ``kv_cache``. The caller picks the rows it needs logits for (``compute_logits``).
        ``return_routes``: also the experts each MoE layer chose, (B, T, MoE layers, k)
        int32 (None for a dense model)."""
        if input_ids.dim() != 2 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be (B, T), got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        inputs = AttentionInputs(cos=None, sin=None, kv_cache=kv_cache, positions=positions)
        hidden, _, routes = self._run_layers(input_ids, positions, inputs)
        if not return_routes:
            return hidden
        batch, steps = input_ids.shape
        used = torch.stack(routes, 1).reshape(batch, steps, len(routes), -1) if routes else None
        return hidden, used

    def forward_step(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     kv_cache: KVCache) -> torch.Tensor:
        """Inference: ids and positions (B, T) -> logits (B, T, V); k/v go into ``kv_cache``."""
        return self.compute_logits(self.forward_step_hidden(input_ids, positions, kv_cache))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), causal, positions 0..T-1."""
        return self.compute_logits(self.forward_hidden(input_ids).hidden_states)


    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "CausalLM":
        """Build from ``path/config.json`` on the meta device and load the safetensors shards
        into it one by one (per-expert or fused keys; never a pickle). Returns eval mode."""
        from livethinking.model import checkpoint  # checkpoint IO stays out of model import

        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: no config.json in the checkpoint directory")
        config = ModelConfig.from_dict(json.loads(config_file.read_text()))
        with torch.device("meta"):
            model = cls(config)
        checkpoint.load_into(model, path, dtype=dtype, device=device)
        # non-persistent buffers (the rotary inverse frequencies) are rebuilt, not read
        model.model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
        return model.eval()

    def save_pretrained(self, path, *, tokenizer=None,
                        max_shard_bytes: int | None = None) -> Path:
        """Write safetensors (per-expert keys, as transformers saves them) and config.json
        (+ tokenizer files) atomically: a temporary directory renamed into place."""
        from livethinking.model import checkpoint

        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        return checkpoint.save_checkpoint(self.state_dict(), self.config.to_dict(), path,
                                          tokenizer=tokenizer, **kwargs)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, steps: int) -> torch.Tensor:
    if batch != 1:
        raise ValueError(f"packed input (cu_seqlens) must be a single row, got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [0, ..., total], got {tuple(cu_seqlens.shape)}")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != steps or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the row length {steps}, got {values}")
    return cu_seqlens.to(torch.int32)
