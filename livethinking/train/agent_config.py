"""Configuration of multi-turn agent training: SFT on expert trajectories, then GRPO on
trajectories the policy plays against an environment (``livethinking.train.agent``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from livethinking.rollout.trajectory import TrajectoryConfig
from livethinking.train.config import LossConfig, OptimConfig, RunConfig

__all__ = ["AgentGRPOConfig", "AgentSFTConfig", "EnvConfig"]


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(kw_only=True, slots=True)
class EnvConfig:
    """``name``: a registered environment (``shop``) or ``module:Class``; ``config``: its
    config's fields (for ``shop``: ``catalogue``, ``max_turns``, ``loose_weight``...)."""

    name: str = "shop"
    config: dict = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class AgentSFTConfig:
    """SFT on whole trajectories (JSON lines of ``{"messages": [...]}``: the opening
    messages, then assistant turns and the environment's replies); the loss covers the
    assistant turns' tokens only. The environment gives the tool schemas of the prompt."""

    model: str
    train_data: str
    env: EnvConfig = field(default_factory=EnvConfig)
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs
    row_tokens: int = 1024
    rows_per_step: int = 4
    aux_loss: bool = True
    activation_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval_data: None = None  # agents are evaluated by playing episodes (agent.evaluate_agent)
    system_prompt: None = None

    def __post_init__(self) -> None:
        _positive(self, "epochs", "row_tokens", "rows_per_step")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.run.eval_every:
            raise ValueError("run.eval_every: agent runs have no eval_data; evaluate by "
                             "playing held-out episodes")


@dataclass(kw_only=True, slots=True)
class AgentGRPOConfig:
    """GRPO on multi-turn trajectories: ``tasks_per_step`` tasks × ``group_size``
    trajectories each, rewards from the environment, advantages normalised per group;
    ``loss.credit`` token (the token-level loss on every model token of the trajectory) or
    chunk (IPA: a ratio and a normalisation per model turn)."""

    model: str
    train_data: str  # the environment's tasks (its load_tasks format)
    env: EnvConfig = field(default_factory=EnvConfig)
    steps: int = 20
    tasks_per_step: int = 4
    group_size: int = 4
    updates_per_batch: int = 1
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal
    aux_loss: bool = True
    micro_batch_tokens: int = 8192
    activation_checkpointing: bool = False
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(credit="chunk"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval_data: None = None
    system_prompt: None = None

    def __post_init__(self) -> None:
        _positive(self, "steps", "tasks_per_step", "group_size", "updates_per_batch",
                  "micro_batch_tokens")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare a task's "
                             f"trajectories), got {self.group_size}")
        if self.tasks_per_step % self.updates_per_batch:
            raise ValueError(f"tasks_per_step ({self.tasks_per_step}) must be a multiple of "
                             f"updates_per_batch ({self.updates_per_batch})")
        if self.loss.routing_replay == "old":
            raise ValueError("loss.routing_replay old is not supported for agents; use none or "
                             "rollout (the engine's experts of every turn)")
        if self.run.eval_every:
            raise ValueError("run.eval_every: agent runs have no eval_data; evaluate by "
                             "playing held-out episodes")
