"""What the engine hands back: per request, the samples so far, cumulative."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "RequestOutput"]


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request, cumulative since its start.

    ``logprobs[i]`` is log softmax(logits / temperature)[token_ids[i]] in fp32, before
    top-k/top-p truncation (None when the request did not ask for log-probs).
    ``finish_reason``: None while running, then "stop" (end-of-sequence token, stop token
    or stop string), "length" (max_tokens or the context limit) or "abort".
    ``stop_reason`` (vLLM's): the stop string or ``stop_token_ids`` id it stopped on; None
    otherwise, an end-of-sequence token included. ``routed_experts``: when asked for, once
    finished, the experts each MoE layer chose for every token but the last,
    (prompt + output − 1, MoE layers, top_k) int16 on the CPU.
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routed_experts: object = None  # torch.Tensor when asked for and finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's state after an engine step. Times are ``time.perf_counter()`` seconds."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    arrival_time: float
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first sampled token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time
