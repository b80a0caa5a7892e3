"""A sequence being generated: its tokens, how many have KV in the cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from livethinking.engine.sampling_params import SamplingParams

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # some tokens still lack KV (new, chunked prefill, or preempted)
    RUNNING = "running"  # every token but the last has KV: one token per step (decode)
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """One sample of a request.

    ``token_ids`` = prompt + output. KV is in the cache for the first ``num_computed``
    tokens; a step computes ``token_ids[num_computed:]`` (or a chunk of it) and, once all
    are computed, samples the next token from the last one's logits.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    noise_key: int | None = None  # the sampler's per-sample key, when the request is seeded
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading full blocks registered in the prefix cache
    last_block_hash: int | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on admission
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string it ended on
    needs_fork: bool = False  # the first sample of an n > 1 request is drawn n times
    routed_experts: torch.Tensor | None = None  # (len − 1, MoE layers, k) int16, at the end

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
