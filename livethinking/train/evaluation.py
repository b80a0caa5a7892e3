"""Periodic held-out evaluation during a run: greedy answers to ``eval_data`` judged for
correctness and helpfulness, tokens per response and time to first token (``evaluate``),
logged as ``eval/correct``, ``eval/helpful``, ``eval/tokens_per_response``, ``eval/ttft_ms``.

Under torchrun only rank 0 evaluates, on a full (unsharded) copy of the policy that the
other ranks help gather (a collective) and then wait for at a barrier; no rank runs an
FSDP forward during evaluation, so the ranks' collectives stay matched. The RNG state is
restored afterwards: a run with evaluation trains exactly as one without.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from livethinking.train.common import evaluate, load_policy
from livethinking.train.config import JudgeConfig
from livethinking.train.distributed import DistributedContext, barrier, full_state_dict

__all__ = ["EVAL_PLOTS", "HeldOutEvaluation", "evaluation_steps"]

EVAL_PLOTS = {"held-out correct and helpful": ["eval/correct", "eval/helpful"],
              "held-out tokens per response": ["eval/tokens_per_response"],
              "held-out TTFT": ["eval/ttft_ms"]}


def evaluation_steps(total: int, every: int) -> set[int]:
    """The steps after which a run evaluates: 0, every ``every``-th (when > 0) and ``total``."""
    return {0, total} | (set(range(every, total, every)) if every > 0 else set())


class HeldOutEvaluation:
    """Evaluates the policy on held-out records; ``__call__`` returns the ``eval/…`` values
    on rank 0 and None elsewhere (every rank must call it: it gathers the weights)."""

    def __init__(self, records, judge: JudgeConfig, *, max_tokens: int,
                 system_prompt: str | None, policy_path: Path, dist: DistributedContext,
                 device: torch.device, dtype: torch.dtype, task=None) -> None:
        from livethinking.train.tasks import Task

        self.records, self.max_tokens, self.system_prompt = records, max_tokens, system_prompt
        self.policy_path, self.dist, self.device, self.dtype = policy_path, dist, device, dtype
        self.task = task or Task(system_prompt=system_prompt)  # prompts and judges
        self.judges = self.task.judges(judge) if dist.is_main else None
        self._full_copy = None  # rank 0's unsharded policy under FSDP, loaded on first use

    def __call__(self, model, tokenizer) -> dict[str, float] | None:
        if self.dist.world_size > 1:
            state = full_state_dict(model, self.dist)  # rank 0 gets it, on the CPU
            if self.dist.is_main:
                if self._full_copy is None:
                    self._full_copy, _ = load_policy(self.policy_path, self.device, self.dtype)
                    self._full_copy.requires_grad_(False)
                self._full_copy.load_state_dict(state)
            model = self._full_copy
        result = None
        if self.dist.is_main:
            python_state = random.getstate()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda"
                                       else []):
                outcome = evaluate(model, tokenizer, self.records, self.judges,
                                   max_tokens=self.max_tokens, prompt=self.task.prompt_ids)
            random.setstate(python_state)
            result = {f"eval/{k}": v for k, v in outcome.as_dict().items()}
        barrier(self.dist)
        return result
