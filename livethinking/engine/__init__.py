"""Inference engine (floor 4): paged KV cache with prefix caching, continuous batching with
chunked prefill, CUDA-graph decode, a sync-free sampler; ``LLM`` is the front door.

The engine knows neither the trainer nor HTTP: both sit on top of it.
"""

from livethinking.engine.config import EngineConfig, EngineFullError, EngineStats
from livethinking.engine.llm import LLM
from livethinking.engine.llm_engine import LLMEngine
from livethinking.engine.outputs import CompletionOutput, RequestOutput
from livethinking.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "EngineFullError", "EngineStats",
           "LLMEngine", "RequestOutput", "SamplingParams"]
