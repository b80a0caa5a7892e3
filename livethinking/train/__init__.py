"""The trainer (floor 5): RFT then GRPO, their configs, checkpoints and metrics, the demo.

``run_rft`` / ``run_grpo`` are what ``livethinking rft`` / ``livethinking grpo`` (and
``python -m livethinking.train`` under torchrun) call; ``run_demo`` is ``livethinking demo``.
Both run on one skeleton (``loop.run_training``); ``RFTTrainer`` and ``GRPOTrainer`` are
the algorithms it runs (preparation, step, checkpoint state).
"""

from livethinking.train.config import (GRPOConfig, JudgeConfig, LossConfig, OptimConfig,
                                       RewardConfig, RFTConfig, RolloutConfig, RunConfig,
                                       TeacherConfig)
from livethinking.train.config_io import ConfigError, load_config
from livethinking.train.demo import DemoSize, run_demo
from livethinking.train.grpo import GRPOTrainer, run_grpo
from livethinking.train.rft import RFTTrainer, run_rft

__all__ = ["ConfigError", "DemoSize", "GRPOConfig", "GRPOTrainer", "JudgeConfig", "LossConfig",
           "OptimConfig", "RFTConfig", "RFTTrainer", "RewardConfig", "RolloutConfig", "RunConfig",
           "TeacherConfig", "load_config", "run_demo", "run_grpo", "run_rft"]
