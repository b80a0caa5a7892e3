"""The run skeleton RFT and GRPO share; each algorithm supplies its preparation and step.

``run_training`` does, in this order: start the run (output folder, seeds, device, the
torchrun group, the checkpoint to resume from), load the policy (gradient checkpointing as
configured) and shard it under torchrun, let the algorithm prepare (data, engines), build
the optimizer, restore a checkpoint, open the metrics logger and progress bar, then loop:
step → log → held-out evaluation → checkpoint; finally save the model and draw the plots.
Evaluation runs before the checkpoint of the same step, so a checkpoint at step s implies
the evaluation at s was logged, and a resumed run does not repeat it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from livethinking.train.checkpointing import (checkpoint_collectively, load_trainer_state,
                                              restore_optimizer, save_final_model,
                                              set_rng_state)
from livethinking.train.common import load_policy, start_run
from livethinking.train.config import JudgeConfig
from livethinking.train.config_io import config_to_dict
from livethinking.train.distributed import DistributedContext, end_distributed, shard_model
from livethinking.train.evaluation import EVAL_PLOTS, HeldOutEvaluation, evaluation_steps
from livethinking.train.metrics import MetricsLogger, plot_metrics
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.tasks import task_of

__all__ = ["Algorithm", "TrainingRun", "run_training"]


@dataclass(slots=True)
class TrainingRun:
    """What the skeleton hands an algorithm: the run's place, devices, policy, optimizer."""

    out: Path
    device: torch.device
    dtype: torch.dtype
    dist: DistributedContext
    policy_path: Path  # where the policy's weights came from (the checkpoint's, if resuming)
    checkpoint: Path | None  # the checkpoint this run resumes from
    model: object  # CausalLM, FSDP-sharded under torchrun
    tokenizer: object
    log: object  # print-like; silent off rank 0
    optimizer: MasterWeightAdamW | None = None  # set once the algorithm has prepared


class Algorithm(Protocol):
    """One training algorithm on the skeleton (RFT, GRPO)."""

    name: str  # the progress label and log prefix
    plots: dict[str, list[str]]  # plot title -> metric keys
    judge: JudgeConfig  # judges for the held-out evaluation

    def prepare(self, run: TrainingRun) -> tuple[int, int]:
        """Load data and engines; returns (loop steps, optimizer steps)."""

    def start(self, state: dict | None) -> None:
        """Restore from a checkpoint's trainer state, or start fresh (None)."""

    def step(self, step: int) -> dict[str, float]:
        """Loop step ``step`` (0-based): its optimizer updates; the same stats on every rank."""

    def checkpoint_state(self) -> dict:
        """What a checkpoint must hold besides the model, optimizer, RNG and step."""

    def postfix(self, stats: dict[str, float]) -> dict[str, str]:
        """The progress bar's summary of a step."""

    # optional: ``finish()`` releases what the algorithm holds (connections, process groups);
    # run_training calls it once at the end, also after a failure


def run_training(config, algorithm: Algorithm, *, resume: bool, log=print) -> Path:
    """Run ``algorithm`` under ``config`` (RFTConfig / GRPOConfig: model, eval_data,
    system_prompt, optim, run); returns the directory of the final model (HF format)."""
    settings = config.run
    start_at = start_run(settings, config.model, resume=resume)
    dist, checkpoint = start_at.dist, start_at.checkpoint
    if not dist.is_main:
        log = (lambda *_: None)
    model, tokenizer = load_policy(start_at.policy_path, start_at.device, start_at.dtype)
    # top-level activation_checkpointing (run.gradient_checkpointing: its older spelling)
    model.gradient_checkpointing = bool(getattr(config, "activation_checkpointing", False)
                                        or settings.gradient_checkpointing)
    if dist.world_size > 1:  # a bf16 run keeps fp32 shards, computes in bf16 (FSDP2 MP)
        shard_model(model, dist, param_dtype=start_at.dtype)
    run = TrainingRun(start_at.out, start_at.device, start_at.dtype, dist, start_at.policy_path,
                      checkpoint, model, tokenizer, log)
    total, optimizer_steps = algorithm.prepare(run)
    run.optimizer = MasterWeightAdamW(model.named_parameters(), config.optim, optimizer_steps)
    start = 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        restore_optimizer(run.optimizer, checkpoint, state["optimizer"], dist)
        set_rng_state(state["rng"])
        start = int(state["step"])
        log(f"{algorithm.name}: resumed from {checkpoint} at step {start}")
        algorithm.start(state)
    else:
        algorithm.start(None)
    evaluation, evaluate_at = None, set()
    if config.eval_data:
        task = task_of(config)
        records = task.load(config.eval_data, on_error=config.on_bad_record)
        evaluation = HeldOutEvaluation(
            records, algorithm.judge, max_tokens=settings.eval_max_tokens,
            system_prompt=config.system_prompt, policy_path=start_at.policy_path, dist=dist,
            device=start_at.device, dtype=start_at.dtype, task=task)
        evaluate_at = evaluation_steps(total, settings.eval_every)
    logger = MetricsLogger(run.out, tensorboard=settings.tensorboard,
                           resume_step=start if checkpoint is not None else None) \
        if dist.is_main else None

    def maybe_evaluate(step: int) -> None:
        if evaluation is None or step not in evaluate_at:
            return
        values = evaluation(model, tokenizer)
        if logger is not None:
            logger.log(step, values)
            log(f"{algorithm.name}: held-out evaluation at step {step}: {values}")

    config_json = json.dumps(config_to_dict(config), indent=2)
    progress = _progress(settings.progress and dist.is_main, total, start, algorithm.name)
    if checkpoint is None:
        maybe_evaluate(0)
    try:
        for step in range(start, total):
            stats = algorithm.step(step)
            if logger is not None and ((step + 1) % settings.log_every == 0
                                       or step + 1 == total):
                logger.log(step + 1, stats)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(algorithm.postfix(stats))
            maybe_evaluate(step + 1)
            if settings.save_every and (step + 1) % settings.save_every == 0 \
                    and step + 1 < total:
                checkpoint_collectively(run.out, step + 1, model, tokenizer, run.optimizer,
                                        algorithm.checkpoint_state(), config_json, dist,
                                        dtype=start_at.dtype)
    finally:
        if hasattr(algorithm, "finish"):
            algorithm.finish()
    if progress is not None:
        progress.close()
    final = save_final_model(run.out / "final", model, tokenizer, dist, dtype=start_at.dtype)
    end_distributed(dist)  # the last collective is done
    if logger is None:
        return final
    logger.close()
    if settings.plots:
        plot_metrics(logger.path, run.out / "plots",
                     algorithm.plots | (EVAL_PLOTS if evaluation is not None else {}))
    return final


def _progress(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)
