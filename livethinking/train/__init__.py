"""The trainer (floor 6): RFT, DPO and GRPO, their configs, checkpoints and metrics, the
demo.

``run_rft`` / ``run_dpo`` / ``run_grpo`` are what ``livethinking rft|dpo|grpo`` (and
``python -m livethinking.train`` under torchrun) call; ``run_demo`` is ``livethinking demo``.
All run on one skeleton (``loop.run_training``); ``RFTTrainer``, ``DPOTrainer`` and
``GRPOTrainer`` are the algorithms it runs (preparation, step, checkpoint state). A run's
``task`` (``train/tasks.py``) says how its records load, prompt and are judged.
"""

from livethinking.train.config import (DifficultyConfig, DPOConfig, GRPOConfig, JudgeConfig,
                                       LossConfig, OptimConfig, PassAtNConfig, RewardConfig,
                                       RFTConfig, RolloutConfig, RunConfig, TeacherConfig)
from livethinking.train.config_io import ConfigError, load_config
from livethinking.train.demo import DemoSize, run_demo
from livethinking.train.dpo import DPOTrainer, run_dpo
from livethinking.train.grpo import GRPOTrainer, run_grpo
from livethinking.train.rft import RFTTrainer, run_rft

__all__ = ["ConfigError", "DPOConfig", "DPOTrainer", "DemoSize", "DifficultyConfig",
           "GRPOConfig", "GRPOTrainer", "JudgeConfig", "LossConfig", "OptimConfig",
           "PassAtNConfig", "RFTConfig", "RFTTrainer", "RewardConfig", "RolloutConfig",
           "RunConfig", "TeacherConfig", "load_config", "run_demo", "run_dpo", "run_grpo",
           "run_rft"]
