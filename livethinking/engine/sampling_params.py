"""What a request asks of the sampler: temperature, truncation, length, stops, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SamplingParams"]


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """Sampling of one request (all fields validated on construction).

    A token is drawn from softmax(logits / temperature) restricted to the ``top_k`` most
    likely tokens and to the smallest set whose probability reaches ``top_p``;
    ``temperature == 0`` is greedy (argmax). The reported log-prob of a sampled token is
    log softmax(logits / temperature) at it *before* top-k/top-p truncation (temperature 1
    when greedy), the quantity the trainer's ``fused_linear_logprobs`` computes.

    ``n`` samples share one prefill of the prompt. ``seed`` makes a request's samples
    reproducible whatever else shares the batch. Generation stops at ``max_tokens``, at an
    end-of-sequence token (unless ``ignore_eos``), at any of ``stop_token_ids`` (kept in the
    output), or when the text contains one of ``stop`` (the text is cut before it).
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1: off), got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
