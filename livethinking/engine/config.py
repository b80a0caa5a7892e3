"""Engine configuration, statistics and the admission error."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineConfig", "EngineFullError", "EngineStats"]


class EngineFullError(RuntimeError):
    """Raised by ``add_request`` when ``max_waiting`` requests already wait (HTTP 429)."""


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """How the engine lays out its KV cache and schedules.

    ``num_kv_blocks`` None sizes the paged cache on CUDA as ``gpu_memory_utilization`` of
    the GPU's total memory less the weights and the measured activation peak of a
    ``max_num_batched_tokens`` forward; on CPU to hold ``max_num_seqs`` full-length
    sequences up to ``cpu_kv_cache_bytes``. ``deterministic`` runs every sequence on its own (batch-invariant
    samples) and reports a finished sequence's log-probs as the trainer computes them (a
    full forward and ``fused_linear_logprobs``), at the cost of one forward per sequence.
    ``enable_return_routed_experts`` (MoE models) keeps, beside each KV slot, the experts
    every MoE layer chose for that token (2·layers·top_k bytes per slot), so requests can
    ask for their routes (``SamplingParams.return_routed_experts``; in ``deterministic``
    mode the routes come from the same full forward as the reported log-probs).
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int = 256
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    deterministic: bool = False
    enable_return_routed_experts: bool = False
    paged_decode_kernel: bool | None = None  # None: in-place decode op; True Triton; False gather
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")
        self.cuda_graph_batch_sizes = tuple(sorted(set(self.cuda_graph_batch_sizes)))
        if any(b < 1 for b in self.cuda_graph_batch_sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be >= 1, got "
                             f"{self.cuda_graph_batch_sizes}")


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine; the token counters are cumulative."""

    num_waiting: int
    num_running: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefill_tokens: int  # prompt tokens actually computed (cache hits excluded)
    decode_tokens: int
    num_preemptions: int
    # decode-only steps: their wall time in ``step()`` and the part inside the model runner
    # (forward + sampling); the rest is the engine's host work (scheduling, appending,
    # detokenising, building outputs)
    decode_steps: int = 0
    decode_step_seconds: float = 0.0
    decode_model_seconds: float = 0.0

    @property
    def decode_host_us_per_token(self) -> float:
        """Host time outside the model runner per decode step per sequence, µs."""
        host = self.decode_step_seconds - self.decode_model_seconds
        return 1e6 * host / max(self.decode_tokens, 1)

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens looked up (0 when none)."""
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0
