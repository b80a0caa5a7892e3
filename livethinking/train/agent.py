"""Multi-turn agents on the run skeleton: SFT on expert trajectories, GRPO on trajectories
the policy plays (``run_agent_sft``, ``run_agent_grpo``), and held-out play
(``evaluate_agent``).

A trajectory trains as one row: the opening prompt, then every token after it; the loss
covers the model's own tokens only (``model_mask``: tool results and user turns never are
targets). GRPO's advantage is the trajectory's, normalised within its task's group; with
``loss.credit: chunk`` each model turn has its own importance ratio and weight in the loss
(``fused_linear_grpo_loss``'s chunk level). One process (no torchrun yet): the engine
shares the policy's weights, so every step samples from the policy just updated, and the
prefix cache (emptied at each weight change) serves each trajectory's earlier turns.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from livethinking import ops
from livethinking.data import load_json_lines
from livethinking.rollout.trajectory import (Trajectory, TrajectoryConfig, TurnRenderer,
                                             run_trajectories, tokenize_conversation)
from livethinking.train.agent_config import AgentGRPOConfig, AgentSFTConfig, EnvConfig
from livethinking.train.config import JudgeConfig
from livethinking.train.grpo import PromptStream
from livethinking.train.grpo_step import (GRPOBatch, completion_logprobs, micro_batches,
                                          micro_loss_scale, policy_loss_backward, trim)
from livethinking.train.loop import TrainingRun, run_training
from livethinking.train.packing import pack_masked
from livethinking.train.rft import RFTTrainer

__all__ = ["AgentGRPOTrainer", "AgentSFTTrainer", "evaluate_agent", "make_env",
           "run_agent_grpo", "run_agent_sft", "trajectory_batch", "trajectory_stats"]


def make_env(config: EnvConfig, registry=None):
    """An environment from ``config`` (``registry``: default the built-ins)."""
    from livethinking.envs import default_registry

    return (registry or default_registry()).make(config.name, dict(config.config))


def _single_process(run: TrainingRun, what: str) -> None:
    if run.dist.world_size > 1:
        raise ValueError(f"{what} runs in one process for now (got world size "
                         f"{run.dist.world_size}); start it without torchrun")


# ---------------------------------------------------------------------------- SFT
def run_agent_sft(config: AgentSFTConfig, *, resume: bool = False, log=print) -> Path:
    """SFT on expert trajectories; returns the final model's directory."""
    return run_training(config, AgentSFTTrainer(config), resume=resume, log=log)


def _expert(obj) -> list[dict]:
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise ValueError('a trajectory must be {"messages": [{"role", "content"}, ...]}')
    return messages


class AgentSFTTrainer(RFTTrainer):
    """RFT's SFT step on packed trajectories, the model's turns the only targets."""

    name = "agent-sft"

    def prepare(self, run: TrainingRun) -> tuple[int, int]:
        config = self.config
        self.run = run
        _single_process(run, "agent SFT")
        renderer = TurnRenderer(run.tokenizer, make_env(config.env).tools())
        conversations = load_json_lines(config.train_data, _expert).items
        examples = []
        for messages in conversations:
            prompt, tokens, mask, _ = tokenize_conversation(renderer, messages)
            examples.append((prompt + tokens, [0] * len(prompt) + mask))
        self.rows, truncated = pack_masked(examples, config.row_tokens, seed=config.run.seed)
        if not self.rows:
            raise RuntimeError(f"no trajectory of {config.train_data} fits a row of "
                               f"{config.row_tokens} tokens")
        self.steps_per_epoch = math.ceil(len(self.rows) / config.rows_per_step)
        total = config.max_steps or config.epochs * self.steps_per_epoch
        run.log(f"agent-sft: {len(conversations)} trajectories in {len(self.rows)} rows of "
                f"{config.row_tokens} tokens ({truncated} truncated); {total} steps")
        return total, total


# ---------------------------------------------------------------------------- batches
def trajectory_batch(trajectories: list[Trajectory], device: torch.device, *,
                     routes: bool = False) -> GRPOBatch:
    """Rows of whole trajectories: completion token j of row b is ``token_ids[j]``,
    predicted at position ``len(prompt_ids) − 1 + j``; ``mask`` = ``model_mask``,
    ``chunk_ids`` = the model turn (−1 elsewhere and on padding). ``routes``: the experts
    the engine chose, from each trajectory's last turn (its request covered every earlier
    token, served from the cache with the experts kept beside the KV)."""
    n = len(trajectories)
    steps = max(len(t) for t in trajectories)
    comp = max(1, max(len(t.token_ids) for t in trajectories))
    ids = torch.zeros(n, steps, dtype=torch.long)
    window = torch.zeros(n, comp, dtype=torch.long)
    targets = torch.zeros(n, comp, dtype=torch.long)
    mask = torch.zeros(n, comp)
    chunks = torch.full((n, comp), -1, dtype=torch.long)
    sampler = torch.zeros(n, comp)
    positions = torch.zeros(n, steps)
    experts = None
    for b, t in enumerate(trajectories):
        p, c = len(t.prompt_ids), len(t.token_ids)
        ids[b, :p + c] = torch.tensor(t.prompt_ids + t.token_ids)
        window[b] = torch.clamp(torch.arange(comp) + p - 1, max=steps - 1)
        targets[b, :c] = torch.tensor(t.token_ids, dtype=torch.long)
        mask[b, :c] = torch.tensor(t.model_mask, dtype=torch.float32)
        chunks[b, :c] = torch.tensor(t.chunk_ids, dtype=torch.long)
        sampler[b, :c] = torch.tensor(t.logprobs, dtype=torch.float32)
        positions[b, p - 1:p - 1 + c] = mask[b, :c]
        if routes:
            last = t.turns[-1].routed_experts
            if last is None:
                raise ValueError("routing replay needs the experts of every trajectory's "
                                 "turns (trajectory.return_routed_experts)")
            rows = torch.as_tensor(last).int()  # (len(t) − 1, layers, k)
            if experts is None:
                experts = torch.zeros(n, steps, *rows.shape[1:], dtype=torch.int32)
            experts[b, :rows.shape[0]] = rows
            experts[b, rows.shape[0]:] = rows[-1:]
    to = (lambda x: None if x is None else x.to(device))
    return GRPOBatch(ids.to(device), window.to(device), targets.to(device), mask.to(device),
                     sampler.to(device), positions.to(device), to(experts), chunks.to(device))


def trajectory_stats(trajectories: list[Trajectory]) -> dict[str, float]:
    """Means over trajectories: reward, strict / loose success (when the environment
    reports them; 0 for an episode the rollout cut first), model turns, tokens (all after the opening prompt, and the model's own),
    tool errors, and the fraction of later turns' prompt tokens the prefix cache served."""
    mean = (lambda xs: statistics.fmean(xs) if xs else 0.0)
    later = [turn for t in trajectories for turn in t.turns[1:]]
    out = {"reward": mean([t.reward for t in trajectories]),
           "turns": mean([len(t.turns) for t in trajectories]),
           "tokens": mean([len(t.token_ids) for t in trajectories]),
           "model_tokens": mean([t.num_model_tokens for t in trajectories]),
           "tool_errors": mean([sum(m["content"].startswith("error:") for m in t.messages
                                    if m["role"] == "tool") for t in trajectories]),
           "prefix_hit": (sum(x.cached_tokens for x in later)
                          / max(1, sum(x.prompt_tokens for x in later)))}
    for key in ("strict", "loose"):  # an episode cut before the environment ended it: 0
        if any(key in t.info for t in trajectories):
            out[key] = mean([float(t.info.get(key, 0.0)) for t in trajectories])
    for end in ("done", "max_turns", "max_tokens"):
        out[f"end/{end}"] = mean([t.end == end for t in trajectories])
    return out


def evaluate_agent(llm, tokenizer, env_config: EnvConfig, tasks: list, config: TrajectoryConfig,
                   *, seed: int = 0, registry=None) -> tuple[dict[str, float], list[Trajectory]]:
    """Play every task once (``config``'s sampling; temperature 0 for greedy) with one
    environment per task, all at once; (trajectory_stats, the trajectories)."""
    envs = [make_env(env_config, registry) for _ in tasks]
    renderer = TurnRenderer(tokenizer, envs[0].tools() if envs else None)
    trajectories = run_trajectories(llm, renderer, envs, tasks, config,
                                    [seed * 1000003 + i for i in range(len(tasks))])
    return trajectory_stats(trajectories), trajectories


# ---------------------------------------------------------------------------- GRPO
def run_agent_grpo(config: AgentGRPOConfig, *, resume: bool = False, log=print) -> Path:
    """GRPO on multi-turn trajectories; returns the final model's directory."""
    return run_training(config, AgentGRPOTrainer(config), resume=resume, log=log)


class AgentGRPOTrainer:
    name = "agent-grpo"
    plots = {"agent reward": ["reward", "strict", "loose"],
             "agent turns and tokens": ["turns", "model_tokens"],
             "agent loss": ["loss"]}

    def __init__(self, config: AgentGRPOConfig) -> None:
        self.config = config
        self.judge = JudgeConfig()
        self.run: TrainingRun | None = None
        self.tasks: list = []
        self.envs: list = []
        self.llm = None
        self.renderer = None
        self.reference = None
        self.stream: PromptStream | None = None

    def prepare(self, run: TrainingRun) -> tuple[int, int]:
        from livethinking.engine import LLM

        config = self.config
        self.run = run
        _single_process(run, "agent GRPO")
        G = config.group_size
        self.envs = [make_env(config.env) for _ in range(config.tasks_per_step * G)]
        self.tasks = type(self.envs[0]).load_tasks(config.train_data)
        if not self.tasks:
            raise RuntimeError(f"{config.train_data} holds no task")
        self.renderer = TurnRenderer(run.tokenizer, self.envs[0].tools())
        replay = config.loss.routing_replay == "rollout" and run.model.config.num_experts > 0
        self.llm = LLM(run.model, run.tokenizer, enable_return_routed_experts=replay,
                       max_num_seqs=max(64, config.tasks_per_step * G),
                       max_model_len=min(run.model.config.max_position_embeddings,
                                         config.trajectory.max_total_tokens))
        if config.loss.beta > 0:
            from livethinking.train.common import load_policy

            self.reference, _ = load_policy(config.model, run.device, run.dtype)
            self.reference.eval().requires_grad_(False)
        self.stream = PromptStream(len(self.tasks), config.run.seed)
        return config.steps, config.steps * config.updates_per_batch

    def start(self, state: dict | None) -> None:
        if state is not None:
            self.stream.cursor = int(state["cursor"])

    def checkpoint_state(self) -> dict:
        return {"cursor": self.stream.cursor}

    def postfix(self, stats: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{stats['reward']:.3f}", "turns": f"{stats['turns']:.1f}"}

    def rollouts(self) -> list[Trajectory]:
        """``group_size`` trajectories of each of the step's tasks, consecutive per task."""
        config = self.config
        G = config.group_size
        picks = self.stream.take(config.tasks_per_step)
        tasks = [self.tasks[i] for i, _ in picks for _ in range(G)]
        seeds = [config.run.seed * 1000003 + cursor * G + g for _, cursor in picks
                 for g in range(G)]
        trajectory = config.trajectory
        if config.loss.routing_replay == "rollout" and not trajectory.return_routed_experts:
            from dataclasses import replace

            trajectory = replace(trajectory, return_routed_experts=True)
        return run_trajectories(self.llm, self.renderer, self.envs, tasks, trajectory, seeds)

    def step(self, step: int) -> dict[str, float]:
        config, G = self.config, self.config.group_size
        began = time.perf_counter()
        trajectories = self.rollouts()
        stats = trajectory_stats(trajectories)
        stats["rollout_s"] = time.perf_counter() - began
        groups = [trajectories[i:i + G] for i in range(0, len(trajectories), G)]
        if config.dynamic_sampling:
            kept = [g for g in groups if max(t.reward for t in g) - min(t.reward for t in g)
                    > 1e-9]
        else:
            kept = groups
        stats["groups_kept"] = float(len(kept))
        if not kept:
            return stats | {"loss": 0.0, "skipped": 1.0}
        flat = [t for g in kept for t in g]
        rewards = torch.tensor([t.reward for t in flat])
        advantages = ops.group_advantages(rewards, G, scale=config.loss.advantage_scale)
        train_began = time.perf_counter()
        stats |= self.update(flat, advantages.to(self.run.device), len(kept))
        stats["train_s"] = time.perf_counter() - train_began
        stats["model_tokens_per_s"] = (sum(t.num_model_tokens for t in flat)
                                       / (time.perf_counter() - began))
        return stats

    def _forward_logprobs(self, model, batch: GRPOBatch, lengths: list[int]) -> torch.Tensor:
        groups = micro_batches(lengths, self.config.micro_batch_tokens)
        return completion_logprobs(model, batch, self.config.trajectory.temperature,
                                   groups=groups)

    def update(self, flat: list[Trajectory], advantages: torch.Tensor, num_groups: int
               ) -> dict[str, float]:
        """``updates_per_batch`` optimizer steps over minibatches of whole groups; old
        log-probs (a forward before the first update) only when there are several."""
        config, run = self.config, self.run
        G, loss_cfg = config.group_size, config.loss
        replay = loss_cfg.routing_replay == "rollout" and run.model.config.num_experts > 0
        batch = trajectory_batch(flat, run.device, routes=replay)
        lengths = [len(t) for t in flat]
        old = None if config.updates_per_batch == 1 else \
            self._forward_logprobs(run.model, batch, lengths)
        ref = None if self.reference is None else \
            self._forward_logprobs(self.reference, batch, lengths)
        order = torch.randperm(num_groups,
                               generator=torch.Generator().manual_seed(self.stream.cursor))
        results = []
        for chosen in torch.tensor_split(order, min(config.updates_per_batch, num_groups)):
            rows = (chosen[:, None] * G + torch.arange(G)).reshape(-1).tolist()
            results.append(self._minibatch(batch, rows, lengths, advantages, old, ref)
                           | run.optimizer.step())
        return {key: statistics.fmean(r[key] for r in results) for key in results[0]}

    def _minibatch(self, batch: GRPOBatch, rows: list[int], lengths: list[int],
                   advantages: torch.Tensor, old, ref) -> dict[str, float]:
        """Gradients of one minibatch, accumulated over microbatches of whole rows, each
        scaled to its share (dapo: ÷ the minibatch's model tokens; chunk: ÷ its turns)."""
        config, run, loss_cfg = self.config, self.run, self.config.loss
        total_tokens = float(batch.mask[rows].sum())
        chunk = loss_cfg.credit == "chunk"
        loss_type = "chunk" if chunk else loss_cfg.loss_type
        if chunk:
            items = float(sum(len(set(c for c in batch.chunk_ids[r].tolist() if c >= 0))
                              for r in rows))
        else:
            items = total_tokens
        sums, weight = {"loss": 0.0}, 0.0
        for group in micro_batches([lengths[r] for r in rows], config.micro_batch_tokens):
            index = torch.tensor([rows[i] for i in group], device=run.device)
            micro = trim(batch.rows(index))
            comp = micro.mask.shape[1]
            pick = (lambda t: None if t is None else t[index][:, :comp])
            tokens = float(micro.mask.sum())
            scale = micro_loss_scale(loss_type, len(index), tokens, len(rows), total_tokens)
            result = policy_loss_backward(
                run.model, micro, advantages[index], old_logprobs=pick(old),
                ref_logprobs=pick(ref), rollout_is_weights=None, loss=loss_cfg,
                temperature=config.trajectory.temperature,
                max_completion_length=max(lengths), num_items_in_batch=items,
                aux_loss=config.aux_loss, loss_scale=scale, aux_scale=len(index) / len(rows))
            sums["loss"] += result.pop("loss")
            for key, value in result.items():
                sums[key] = sums.get(key, 0.0) + value * tokens
            weight += tokens
        return {"loss": sums.pop("loss")} | {k: v / max(weight, 1e-12) for k, v in sums.items()}
