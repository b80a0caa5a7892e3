"""What a request asks of the sampler: temperature, truncation, length, stops, seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["GREEDY_TEMPERATURE_EPS", "MAX_SEED", "MAX_TOP_K", "MIN_SEED", "OUTPUT_KINDS",
           "SamplingParams"]

GREEDY_TEMPERATURE_EPS = 1e-5  # below it sampling is greedy (vLLM's _SAMPLING_EPS)
MAX_TOP_K = 2**31 - 1  # top_k beyond the vocabulary keeps every token; int32 bounds it
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # int64, as vLLM's protocol bounds seed
OUTPUT_KINDS = ("cumulative", "final_only")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """Sampling of one request (all fields validated on construction).

    A token is drawn from softmax(logits / temperature) restricted to the ``top_k`` most
    likely tokens and to the smallest set whose probability reaches ``top_p``;
    ``temperature < GREEDY_TEMPERATURE_EPS`` (1e-5, vLLM's ``_SAMPLING_EPS``) is greedy
    (argmax) and is stored as 0 (dividing by a tinier one overflows float32 logits to inf
    and NaN). vLLM also raises temperatures in (0, 1e-2) to 1e-2 (its ``_MAX_TEMP``); we
    keep them, as logits / 1e-5 stay finite in float32 and the reported log-probs stay the
    trainer's at the requested temperature. The reported log-prob of a sampled token is
    log softmax(logits / temperature) at it *before* top-k/top-p truncation (temperature 1
    when greedy), the quantity the trainer's ``fused_linear_logprobs`` computes. Every
    number is bounded by what the sampler can represent (``top_k`` int32, ``seed`` int64;
    non-finite values refused).

    ``n`` samples share one prefill of the prompt. ``seed`` makes a request's samples
    reproducible whatever else shares the batch. Generation stops at ``max_tokens``, at an
    end-of-sequence token (unless ``ignore_eos``), at any of ``stop_token_ids`` (kept in the
    output), or when the text contains one of ``stop`` (the text is cut before it).
    ``return_routed_experts`` (MoE; the engine needs ``enable_return_routed_experts``):
    each finished sample reports the experts every MoE layer chose for each of its tokens
    but the last, (prompt + output − 1, MoE layers, top_k) int16.

    ``output_kind`` (vLLM's ``RequestOutputKind``): ``cumulative`` reports the request after
    every step that advanced it (streaming); ``final_only`` once, when it finished, and
    its text is decoded once then rather than token by token (unless ``stop`` strings must
    be watched for). ``LLM.generate`` and the trajectory rollouts ask for ``final_only``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): no top-k truncation
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = True
    return_routed_experts: bool = False
    output_kind: str = "cumulative"  # or "final_only"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not math.isfinite(self.temperature) or self.temperature < 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < GREEDY_TEMPERATURE_EPS:
            self.temperature = 0.0
        if (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an int in [-1, {MAX_TOP_K}] (0 or -1: off), "
                             f"got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None and (not _is_int(self.seed)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an int in [{MIN_SEED}, {MAX_SEED}], "
                             f"got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got "
                             f"{self.output_kind!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
