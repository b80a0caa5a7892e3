"""The trainer (floor 5): RFT then GRPO, their configs, checkpoints and metrics, the demo.

``run_rft`` / ``run_grpo`` are what ``livethinking rft`` / ``livethinking grpo`` (and
``python -m livethinking.train`` under torchrun) call; ``run_demo`` is ``livethinking demo``.
"""

from livethinking.train.config import (GRPOConfig, JudgeConfig, LossConfig, OptimConfig,
                                       RewardConfig, RFTConfig, RolloutConfig, RunConfig,
                                       TeacherConfig)
from livethinking.train.config_io import ConfigError, load_config
from livethinking.train.demo import DemoSize, run_demo
from livethinking.train.grpo import run_grpo
from livethinking.train.rft import run_rft

__all__ = ["ConfigError", "DemoSize", "GRPOConfig", "JudgeConfig", "LossConfig", "OptimConfig",
           "RFTConfig", "RewardConfig", "RolloutConfig", "RunConfig", "TeacherConfig",
           "load_config", "run_demo", "run_grpo", "run_rft"]
