"""Qwen3-MoE and dense Qwen3 models on livethinking's ops (floor 3).

``ModelConfig`` reads a Hugging Face ``config.json``; ``CausalLM`` holds the weights under
transformers' parameter names; ``KVCache`` is the protocol an inference cache implements,
``AttendingKVCache`` the base of a cache that also attends, and ``StaticKVCache`` a
contiguous reference one.
"""

from livethinking.model.config import ModelConfig
from livethinking.model.kv_cache import AttendingKVCache, KVCache, StaticKVCache
from livethinking.model.model import CausalLM, HiddenOutput, load_balancing_loss

__all__ = ["AttendingKVCache", "CausalLM", "HiddenOutput", "KVCache", "ModelConfig",
           "StaticKVCache", "load_balancing_loss"]
