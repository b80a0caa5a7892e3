"""The model configuration: the fields of a Hugging Face ``config.json`` we use, validated.

Reads ``model_type`` "qwen3_moe" (Qwen3-MoE) and "qwen3" (dense Qwen3). transformers 5.x
writes the rotary base as ``rope_parameters = {"rope_type": "default", "rope_theta": ...}``
and the expert count of Qwen3-MoE as ``num_local_experts`` (its ``attribute_map`` renames
``num_experts``); older files write ``rope_theta`` and ``num_experts``. Both are read;
:meth:`ModelConfig.to_dict` writes the transformers 5.x spelling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig"]

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    model_type: str = "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # generation stops at any of them
    # Qwen3-MoE only; a dense "qwen3" model has num_experts == 0.
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- reading and writing
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed ``config.json`` (or ``transformers`` ``config.to_dict()``)."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if d.get(key) is None:
                raise ValueError(f"config is missing {key!r}")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (full attention only)")
        kwargs: dict[str, Any] = {
            "model_type": model_type,
            "rope_theta": _rope_theta(d),
            "num_key_value_heads": d.get("num_key_value_heads") or d["num_attention_heads"],
            "head_dim": d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        }
        plain = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "hidden_act", "pad_token_id",
                 "bos_token_id", "eos_token_id")
        moe = ("moe_intermediate_size", "num_experts_per_tok", "norm_topk_prob",
               "decoder_sparse_step", "router_aux_loss_coef", "output_router_logits")
        for key in plain + (moe if model_type == "qwen3_moe" else ()):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        if model_type == "qwen3_moe":
            experts = d.get("num_local_experts", d.get("num_experts"))
            if experts is None:
                raise ValueError("qwen3_moe config is missing 'num_local_experts' / 'num_experts'")
            kwargs["num_experts"] = experts
            kwargs["mlp_only_layers"] = list(d.get("mlp_only_layers") or [])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` fields, in the spelling transformers 5.x writes."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        for key in ("bos_token_id", "eos_token_id"):
            if d[key] is None:
                d.pop(key)
        if self.model_type == "qwen3_moe":
            d["num_local_experts"] = d.pop("num_experts")
            d["architectures"] = ["Qwen3MoeForCausalLM"]
        else:
            for key in ("moe_intermediate_size", "num_experts", "num_experts_per_tok",
                        "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                        "router_aux_loss_coef", "output_router_logits"):
                d.pop(key)
            d["architectures"] = ["Qwen3ForCausalLM"]
        return d

    # ---------------------------------------------------------------- structure
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` is sparse, by transformers' rule."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (a config may give one id or several)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps}, "
                             f"{self.rope_theta}")
        if self.model_type == "qwen3" and self.num_experts:
            raise ValueError("a dense 'qwen3' model has no experts; use model_type 'qwen3_moe'")
        if self.model_type == "qwen3_moe":
            if self.num_experts < 1:
                raise ValueError(f"qwen3_moe needs num_experts >= 1, got {self.num_experts}")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts="
                                 f"{self.num_experts}], got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ValueError(f"moe_intermediate_size must be >= 1, got "
                                 f"{self.moe_intermediate_size}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"mlp_only_layers {bad} out of range [0, {self.num_hidden_layers})")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} out of range [0, {self.vocab_size})")
        if self.eos_token_id is not None and any(
                not isinstance(i, int) or not 0 <= i < self.vocab_size for i in self.eos_token_ids):
            raise ValueError(f"eos_token_id {self.eos_token_id!r} must be ids in [0, {self.vocab_size})")


def _rope_theta(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(d.get("rope_theta", 10000.0))
