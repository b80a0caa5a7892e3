"""``livethinking grpo``: group-relative policy optimisation of the RFT model.

Per step: ``prompts_per_step`` prompts × G rollouts from the engine sharing the policy's
weights (or external servers); rewards w_c·C + w_h·H + w_l·r_len (length band around
L_ref, the starting model's mean length, measured once); advantages normalised per group
(``group_advantages``); dynamic sampling drops groups whose rewards are all equal and
refills from the next prompts (up to ``max_refill_rounds``); then ``updates_per_batch``
minibatch updates of ``fused_linear_grpo_loss``. Old log-probs: on-policy for a single
update; else recomputed by the trainer before the first update. With external rollouts
the sampler's log-probs give truncated importance weights min(e^(old − sampler), cap).
A frozen reference model supplies ref log-probs when β > 0. Rollout seeds are a function
of the prompt cursor, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch

from livethinking import ops
from livethinking.data import load_records
from livethinking.train.checkpointing import (checkpoint_collectively, load_trainer_state,
                                              save_final_model, set_rng_state)
from livethinking.train.common import load_policy, make_judges, prompt_ids, start_run
from livethinking.train.config import GRPOConfig
from livethinking.train.config_io import ConfigError, config_to_dict
from livethinking.train.distributed import (all_reduce_max, all_reduce_min, all_reduce_sum,
                                            end_distributed, full_state_dict, shard_model)
from livethinking.train.grpo_step import (build_batch, completion_logprobs,
                                          policy_loss_backward)
from livethinking.train.metrics import MetricsLogger, plot_metrics
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.rollout import engine_rollouts, openai_rollouts

__all__ = ["PLOTS", "PromptStream", "run_grpo"]

PLOTS = {"reward components": ["reward/total", "reward/correctness", "reward/helpfulness",
                               "reward/length"],
         "response length": ["response_tokens"], "KL": ["kl"], "entropy": ["entropy"],
         "clip fraction": ["clip_ratio_region"]}


class PromptStream:
    """Prompts in seeded per-epoch orders; ``cursor`` counts prompts handed out."""

    def __init__(self, count: int, seed: int, cursor: int = 0) -> None:
        self.count, self.seed, self.cursor = count, seed, cursor
        self._epoch, self._order = -1, []

    def take(self, n: int) -> list[tuple[int, int]]:
        """n (record index, global cursor) pairs."""
        out = []
        for _ in range(n):
            epoch, at = divmod(self.cursor, self.count)
            if epoch != self._epoch:  # one shuffle per epoch, a function of (seed, epoch)
                self._epoch, self._order = epoch, list(range(self.count))
                random.Random(self.seed * 7919 + epoch).shuffle(self._order)
            out.append((self._order[at], self.cursor))
            self.cursor += 1
        return out


def _reward_fn(config: GRPOConfig, l_ref: float):
    from livethinking import rewards

    r = config.reward
    band = rewards.LengthBand(l_ref=l_ref, lambda_lo=r.lambda_lo, lambda_hi=r.lambda_hi,
                              epsilon=r.epsilon or l_ref) if r.w_length else None
    correctness, helpfulness = make_judges(r.judge)
    return rewards.LivestreamReward(correctness, helpfulness, band, rewards.RewardWeights(
        correctness=r.w_correctness, helpfulness=r.w_helpfulness, length=r.w_length),
        length_needs_correct=r.length_needs_correct)


def _rollouts(config, llm, tokenizer, records, picks):
    chosen = [records[i] for i, _ in picks]
    prompts = [prompt_ids(tokenizer, r, config.system_prompt) for r in chosen]
    seeds = [config.run.seed * 1000003 + cursor for _, cursor in picks]
    if config.rollout.source == "engine":
        return engine_rollouts(llm, chosen, prompts, config.rollout, seeds)
    return openai_rollouts(tokenizer, chosen, prompts, config.rollout, seeds)


def measure_l_ref(config: GRPOConfig, llm, tokenizer, records) -> float:
    """The starting model's mean response length (tokens) over up to 32 training prompts."""
    from livethinking.engine import SamplingParams

    sample = records[:32]
    prompts = [prompt_ids(tokenizer, r, config.system_prompt) for r in sample]
    params = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                            max_tokens=config.rollout.max_tokens, seed=config.run.seed,
                            logprobs=False)
    outputs = llm.generate(prompts, params)
    return statistics.fmean(len(o.outputs[0].token_ids) for o in outputs)


def run_grpo(config: GRPOConfig, *, resume: bool = False, log=print) -> Path:
    """Run GRPO; returns the directory of the final model (Hugging Face format)."""
    from livethinking.engine import LLM

    start_at = start_run(config.run, config.model, resume=resume)
    out, device, dtype = start_at.out, start_at.device, start_at.dtype
    dist, checkpoint = start_at.dist, start_at.checkpoint
    if dist.world_size > 1 and config.prompts_per_step % dist.world_size:
        raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) must be a multiple "
                          f"of the number of processes ({dist.world_size})")
    if not dist.is_main:
        log = (lambda *_: None)
    model, tokenizer = load_policy(start_at.policy_path, device, dtype)
    rollout_model = model  # single process: the engine shares the policy's tensors
    if dist.world_size > 1:  # FSDP shards the policy; the engine gets a full copy per rank,
        rollout_model, _ = load_policy(start_at.policy_path, device, dtype)  # refreshed per step
        rollout_model.eval().requires_grad_(False)
        shard_model(model, dist)
    reference = None
    if config.loss.beta > 0:
        reference, _ = load_policy(config.model, device, dtype)
        reference.eval().requires_grad_(False)
    records = load_records(config.train_data, on_error=config.on_bad_record).items
    llm = LLM(rollout_model, tokenizer, deterministic=config.rollout.deterministic,
              max_num_seqs=max(64, config.prompts_per_step * config.rollout.group_size),
              max_model_len=min(model.config.max_position_embeddings, 8192))
    total_updates = config.steps * config.updates_per_batch
    optimizer = MasterWeightAdamW(model.parameters(), config.optim, total_updates)
    start, stream, l_ref = 0, PromptStream(len(records), config.run.seed), config.reward.l_ref
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start, stream.cursor, l_ref = int(state["step"]), int(state["cursor"]), state["l_ref"]
        log(f"grpo: resumed from {checkpoint} at step {start}")
    if l_ref is None and config.reward.w_length:
        l_ref = measure_l_ref(config, llm, tokenizer, records)
        log(f"grpo: L_ref = {l_ref:.1f} tokens (the starting model's mean response length)")
    reward_fn = _reward_fn(config, l_ref or 1.0)
    logger = MetricsLogger(out, tensorboard=config.run.tensorboard,
                           resume_step=start if checkpoint is not None else None) \
        if dist.is_main else None
    config_json = json.dumps(config_to_dict(config), indent=2)
    progress = None
    if config.run.progress and dist.is_main:
        from tqdm.auto import tqdm
        progress = tqdm(total=config.steps, initial=start, desc="grpo", unit="step",
                        dynamic_ncols=True)
    for step in range(start, config.steps):
        stats = _step(config, model, reference, llm, tokenizer, records, stream, reward_fn,
                      optimizer, device, dist)
        if dist.world_size > 1:  # the engine's copy follows the updated policy
            with torch.no_grad():
                rollout_model.load_state_dict(full_state_dict(model, dist, all_ranks=True))
            keys = sorted(stats)
            stats = dict(zip(keys, (v / dist.world_size
                                    for v in all_reduce_sum([stats[k] for k in keys], dist))))
        if logger is not None and ((step + 1) % config.run.log_every == 0
                                   or step + 1 == config.steps):
            logger.log(step + 1, stats)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{stats['reward/total']:.3f}",
                                 length=f"{stats['response_tokens']:.0f}")
        if config.run.save_every and (step + 1) % config.run.save_every == 0 \
                and step + 1 < config.steps:
            checkpoint_collectively(out, step + 1, model, tokenizer, optimizer,
                                    {"cursor": stream.cursor, "l_ref": l_ref}, config_json, dist)
    if progress is not None:
        progress.close()
    final = save_final_model(out / "final", model, tokenizer, dist)
    end_distributed(dist)  # the last collective is done
    if logger is None:
        return final
    logger.close()
    if config.run.plots:
        plot_metrics(logger.path, out / "plots", PLOTS)
    return final


def _step(config: GRPOConfig, model, reference, llm, tokenizer, records, stream, reward_fn,
          optimizer, device, dist) -> dict[str, float]:
    """One rollout batch and its updates. Under data parallelism every rank draws the same
    prompt picks (the cursor advances alike) and keeps every world_size-th; ranks then
    agree on the smallest group count so their FSDP collectives match."""
    began = time.perf_counter()
    G = config.rollout.group_size
    world, rank = dist.world_size, dist.rank
    groups, scores, dropped, rounds = [], [], 0, 0
    want = config.prompts_per_step // world
    while rounds <= config.max_refill_rounds:
        (missing,) = all_reduce_max([want - len(groups)], dist)
        if missing <= 0:
            break
        picks = stream.take(int(missing) * world)[rank::world]
        for group in _rollouts(config, llm, tokenizer, records, picks):
            breakdown = reward_fn.score_many([r.record for r in group], [r.text for r in group],
                                             [len(r.completion_ids) for r in group])
            totals = [b.total for b in breakdown]
            if config.dynamic_sampling and max(totals) - min(totals) < 1e-9:
                dropped += 1
                continue
            if len(groups) < want:
                groups.append(group)
                scores.append(breakdown)
        rounds += 1
    (keep,) = all_reduce_min([len(groups)], dist)
    groups, scores = groups[:int(keep)], scores[:int(keep)]
    rollout_s = time.perf_counter() - began
    stats: dict[str, float] = {"groups_dropped": dropped, "refill_rounds": rounds - 1,
                               "rollout_s": rollout_s}
    if not groups:  # every group was uninformative: nothing to learn from this step
        stats |= {"reward/total": 0.0, "response_tokens": 0.0, "skipped": 1.0}
        return stats
    flat = [r for g in groups for r in g]
    breakdown = [b for s in scores for b in s]
    rewards = torch.tensor([b.total for b in breakdown])
    advantages = ops.group_advantages(rewards, G, scale=config.loss.advantage_scale).to(device)
    for key in ("total", "correctness", "helpfulness", "length"):
        stats[f"reward/{key}"] = statistics.fmean(getattr(b, key) for b in breakdown)
    stats["response_tokens"] = statistics.fmean(len(r.completion_ids) for r in flat)

    train_began = time.perf_counter()
    batch = build_batch(flat, device)
    temperature = config.rollout.temperature
    external = config.rollout.source == "openai"
    old = None
    if config.updates_per_batch > 1 or external:
        if config.rollout.deterministic and not external and batch.sampler_logprobs is not None:
            old = batch.sampler_logprobs  # the engine reported the trainer's own numbers
        else:
            old = completion_logprobs(model, batch, temperature)
    is_weights = None
    if external and batch.sampler_logprobs is not None:
        is_weights = torch.exp(old - batch.sampler_logprobs).clamp(max=config.rollout.is_cap) \
            * batch.mask
    ref = completion_logprobs(reference, batch, temperature) if reference is not None else None
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(stream.cursor))
    update_stats: list[dict[str, float]] = []
    for chosen in torch.tensor_split(order, min(config.updates_per_batch, len(groups))):
        rows = (chosen[:, None] * G + torch.arange(G)).reshape(-1).to(device)
        pick = (lambda t: None if t is None else t[rows])
        items = None
        if world > 1:  # FSDP averages over ranks: normalise by the global count / world
            (tokens,) = all_reduce_sum([float(batch.mask[rows].sum())], dist)
            items = tokens / world
        result = policy_loss_backward(
            model, batch.rows(rows), advantages[rows], old_logprobs=pick(old),
            ref_logprobs=pick(ref), rollout_is_weights=pick(is_weights), loss=config.loss,
            temperature=temperature, max_completion_length=config.rollout.max_tokens,
            num_items_in_batch=items, aux_loss=config.aux_loss)
        update_stats.append(result | optimizer.step())
    for key in update_stats[0]:
        stats[key] = statistics.fmean(s[key] for s in update_stats)
    tokens = float(batch.mask.sum())
    stats["train_s"] = time.perf_counter() - train_began
    stats["tokens_per_s"] = tokens / (time.perf_counter() - began)
    return stats
