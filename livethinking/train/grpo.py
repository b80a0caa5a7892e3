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

Under torchrun every rank draws the same prompt picks and keeps every world_size-th; the
rewards of all ranks are gathered before the advantages are computed (as TRL does), so
``advantage_scale: batch`` divides by the global batch's std, and each rank takes its
slice. ``GRPOTrainer`` holds the state of a step; ``run_training`` (``loop``) runs it.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from livethinking import ops
from livethinking.train.common import load_policy
from livethinking.train.config import GRPOConfig
from livethinking.train.config_io import ConfigError
from livethinking.train.distributed import (all_gather_rows, all_reduce_max, all_reduce_min,
                                            all_reduce_sum, broadcast_from_main,
                                            copy_into_unsharded, full_state_dict, reshard,
                                            shard_model)
from livethinking.train.grpo_step import (build_batch, completion_logprobs, micro_batches,
                                          micro_loss_scale, policy_loss_backward,
                                          rollout_routes, trim)
from livethinking.train.loop import TrainingRun, run_training
from livethinking.train.rollout import engine_rollouts, openai_rollouts, server_rollouts
from livethinking.train.tasks import task_of

__all__ = ["GRPOTrainer", "PLOTS", "PromptStream", "measure_l_ref", "reward_stats",
           "run_grpo"]

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
    correctness, helpfulness = task_of(config).judges(r.judge)
    return rewards.LivestreamReward(correctness, helpfulness, band, rewards.RewardWeights(
        correctness=r.w_correctness, helpfulness=r.w_helpfulness, length=r.w_length),
        length_needs_correct=r.length_needs_correct)


def measure_l_ref(config: GRPOConfig, llm, tokenizer, records) -> float:
    """The starting model's mean response length (tokens) over up to 32 training prompts,
    sampled as the rollouts are (temperature, top_p, top_k, max_tokens)."""
    from livethinking.engine import SamplingParams

    sample = records[:32]
    task = task_of(config)
    prompts = [task.prompt_ids(tokenizer, r) for r in sample]
    params = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                            top_k=config.rollout.top_k, max_tokens=config.rollout.max_tokens,
                            seed=config.run.seed, logprobs=False)
    outputs = llm.generate(prompts, params)
    return statistics.fmean(len(o.outputs[0].token_ids) for o in outputs)


def reward_stats(breakdown, *, length_needs_correct: bool) -> dict[str, float]:
    """Batch means of the reward and its parts. ``reward/length`` is the length term as it
    enters the total (r_len·C when ``length_needs_correct``); ``reward/length_raw`` is r_len."""
    stats = {f"reward/{key}": statistics.fmean(getattr(b, key) for b in breakdown)
             for key in ("total", "correctness", "helpfulness")}
    gate = (lambda b: b.correctness) if length_needs_correct else (lambda b: 1.0)
    stats["reward/length"] = statistics.fmean(b.length * gate(b) for b in breakdown)
    stats["reward/length_raw"] = statistics.fmean(b.length for b in breakdown)
    return stats


def run_grpo(config: GRPOConfig, *, resume: bool = False, log=print):
    """Run GRPO; returns the directory of the final model (Hugging Face format)."""
    return run_training(config, GRPOTrainer(config), resume=resume, log=log)


class GRPOTrainer:
    """GRPO on the run skeleton: ``prepare`` builds the engine (and the reference model),
    ``step`` is one rollout batch — ``collect`` (rollouts, rewards, dynamic sampling),
    ``advantages`` (over the global batch) and ``update`` (``updates_per_batch`` optimizer
    steps over minibatches of groups)."""

    name = "grpo"
    plots = PLOTS

    def __init__(self, config: GRPOConfig) -> None:
        self.config = config
        self.judge = config.reward.judge
        self.task = task_of(config)
        self.run: TrainingRun | None = None
        self.reference = None  # frozen model for the KL term (β > 0)
        self.rollout_model = None  # under torchrun: a full copy for the engine
        self.llm = None
        self.min_blocks = self.rollout_blocks = 0  # the engine's KV pool sizes (blocks)
        self.records: list = []
        self.stream: PromptStream | None = None
        self.l_ref: float | None = config.reward.l_ref
        self.reward_fn = None
        self.update_stats: list[dict[str, float]] = []  # the last step's, one per update
        self.pool = None  # rollout servers (rollout.source: servers)
        self.pusher = None  # rank 0's weight sync with them
        self.weight_version = "0"  # the policy the servers hold: trainer steps pushed
        self.ahead = None  # rollouts sampled ahead of training (rollout.max_staleness > 0)
        self.difficulty = None  # DifficultyFilter (difficulty.enabled)
        self.difficulty_fallbacks = 0  # takes drawn unfiltered this step (the filter kept none)
        self._seen_accuracy: dict[str, float] = {}  # this step's group accuracies (online)

    # ------------------------------------------------------------------ the skeleton's hooks
    def prepare(self, run: TrainingRun) -> tuple[int, int]:
        from livethinking.engine import LLM

        config, dist = self.config, run.dist
        if dist.world_size > 1 and config.prompts_per_step % dist.world_size:
            raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) must be a multiple "
                              f"of the number of processes ({dist.world_size})")
        self.run = run
        self.rollout_model = run.model  # single process: the engine shares the policy's tensors
        if dist.world_size > 1:  # FSDP shards the policy: the engine gets a full copy per rank,
            self.rollout_model, _ = load_policy(run.policy_path, run.device, run.dtype)
            self.rollout_model.eval().requires_grad_(False)  # refreshed after every step
        if config.loss.beta > 0:
            self.reference = self._reference(run)
        self.records = task_of(config).load(config.train_data, on_error=config.on_bad_record)
        if config.difficulty.enabled:
            from livethinking.train.difficulty import DifficultyFilter

            self.difficulty = DifficultyFilter(config.difficulty, [r.id for r in self.records])
        sizing, block = {}, 16
        max_len = min(run.model.config.max_position_embeddings, 8192)
        self.min_blocks = -(-max_len // block)
        if run.device.type == "cuda":  # the pool one rollout batch needs, not 85% of the GPU
            from livethinking.train.memory_plan import rollout_kv_tokens

            self.rollout_blocks = max(-(-rollout_kv_tokens(config, dist.world_size) // block),
                                      self.min_blocks)
            # freed while training: allocated small now, sized at the first rollouts
            sizing = {"num_kv_blocks": self.min_blocks if config.rollout.free_cache_engine
                      else self.rollout_blocks, "block_size": block}
        self.llm = LLM(self.rollout_model, run.tokenizer, **sizing,
                       deterministic=config.rollout.deterministic,
                       enable_return_routed_experts=config.loss.routing_replay == "rollout"
                       and run.model.config.num_experts > 0,
                       max_num_seqs=max(64, config.prompts_per_step * config.rollout.group_size),
                       max_model_len=min(run.model.config.max_position_embeddings, 8192))
        if config.rollout.free_cache_engine:
            self.llm.sleep()
        self.stream = PromptStream(len(self.records), config.run.seed)
        if config.rollout.source == "servers":
            self.pool, self.pusher = _server_rollouts(config, dist.rank)
        return config.steps, config.steps * config.updates_per_batch

    def _reference(self, run: TrainingRun):
        """The frozen reference model: sharded like the policy under torchrun (not a full
        copy per rank); with ``loss.reference_offload`` in CPU memory, on the device a
        layer at a time (loaded on the CPU, so it never sits whole on the device)."""
        from livethinking.train.offload import offload_layers

        offload, dist = self.config.loss.reference_offload, run.dist
        reference, _ = load_policy(self.config.model,
                                   torch.device("cpu") if offload else run.device, run.dtype)
        reference.eval().requires_grad_(False)
        if dist.world_size > 1:
            shard_model(reference, dist, cpu_offload=offload)
        elif offload:
            offload_layers(reference, run.device)
        return reference

    def start(self, state: dict | None) -> None:
        if state is not None:
            self.stream.cursor, self.l_ref = int(state["cursor"]), state["l_ref"]
            self.weight_version = str(state.get("weight_version", "0"))
        if self.difficulty is not None:
            if state is not None and "difficulty" in state:
                self.difficulty.load_state(state["difficulty"])
            else:
                self.estimate_difficulty()
            d = self.difficulty.stats()
            self.run.log(f"grpo: difficulty filter keeps {d['difficulty/kept_fraction']:.1%} of "
                         f"{len(self.records)} prompts (accuracy in ({self.config.difficulty.low}, "
                         f"{self.config.difficulty.high})); histogram " + ", ".join(
                             f"{k.split('_')[-1]}: {v:.0%}" for k, v in d.items()
                             if k.startswith("difficulty/acc_")))
        if self.pool is not None:  # the servers start from the trainer's policy, bit for bit
            push = self.push_weights()
            self.run.log(f"grpo: weights version {self.weight_version} pushed to "
                         f"{int(push.get('push_servers', 0))} rollout servers")
        if self.config.rollout.max_staleness:
            from livethinking.rollout import RolloutsAhead

            # every rank's producer draws the same global batch and samples its share
            take, dist = self.config.prompts_per_step, self.run.dist
            self.ahead = RolloutsAhead(
                lambda: self.rollouts(self.take(take)[dist.rank::dist.world_size]),
                max_ahead=self.config.rollout.max_staleness)
        if self.l_ref is None and self.config.reward.w_length:
            self.wake_engine()
            self.l_ref = measure_l_ref(self.config, self.llm, self.run.tokenizer, self.records)
            self.sleep_engine()
            self.run.log(f"grpo: L_ref = {self.l_ref:.1f} tokens (the starting model's mean "
                         f"response length)")
        self.reward_fn = _reward_fn(self.config, self.l_ref or 1.0)

    def wake_engine(self) -> None:
        """Take the engine's KV pool back for rollouts (``rollout.free_cache_engine``),
        sized now that the optimizer's state exists: on CUDA one rollout batch, within
        ``rollout.gpu_memory_utilization`` of the GPU; elsewhere the size it had."""
        if not self.llm.is_sleeping:
            return
        blocks = None
        if self.run.device.type == "cuda":
            budget = self.llm.engine.runner.budget_blocks(
                self.config.rollout.gpu_memory_utilization)
            blocks = max(self.min_blocks, min(self.rollout_blocks, budget))
        self.llm.wake_up(blocks)

    def sleep_engine(self) -> None:
        """Release the engine's KV pool and CUDA graphs while the policy trains."""
        if self.config.rollout.free_cache_engine:
            self.llm.sleep()

    def estimate_difficulty(self) -> None:
        """The offline accuracy of every training prompt: read from
        ``difficulty.accuracy_file``, or from ``difficulty.samples`` samples per prompt of
        the starting model (rank 0, through the engine; broadcast)."""
        from dataclasses import replace

        from livethinking.train.difficulty import read_accuracies

        d, dist = self.config.difficulty, self.run.dist
        accuracy = None
        if d.accuracy_file is not None:
            accuracy = read_accuracies(d.accuracy_file, [r.id for r in self.records])
        elif dist.is_main:
            self.wake_engine()
            config, tokenizer = self.config, self.run.tokenizer
            prompts = [self.task.prompt_ids(tokenizer, r) for r in self.records]
            seeds = [config.run.seed * 1000003 - 1 - i for i in range(len(self.records))]
            groups = engine_rollouts(self.llm, self.records, prompts,
                                     replace(config.rollout, group_size=d.samples), seeds)
            correctness, _ = self.task.judges(config.reward.judge)
            accuracy = {}
            for record, group in zip(self.records, groups):
                verdicts = correctness.judge_many([record] * len(group), [r.text for r in group])
                accuracy[record.id] = statistics.fmean(v.score >= 1.0 for v in verdicts)
            self.sleep_engine()
        self.difficulty.update(broadcast_from_main(accuracy, dist))

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` prompt picks of the stream the difficulty filter keeps (all of
        them without one); the cursor also passes the skipped ones. When the filter keeps
        no prompt at all (every estimate solved or hopeless) the picks are unfiltered and
        counted (``difficulty/fallback``): the online estimates can then bring prompts back."""
        if self.difficulty is None:
            return self.stream.take(n)
        if self.difficulty.kept_fraction() == 0.0:  # all solved or all hopeless: draw any
            self.difficulty_fallbacks += 1
            return self.stream.take(n)
        out = []
        while len(out) < n:
            (pick,) = self.stream.take(1)
            if self.difficulty.keeps(self.records[pick[0]].id):
                out.append(pick)
        return out

    def merge_accuracies(self) -> None:
        """Online difficulty: every rank's group accuracies of this step (gathered, so the
        ranks' filters stay equal and draw the same picks) replace the estimates."""
        if self.difficulty is None or not self.config.difficulty.online:
            return
        dist, index = self.run.dist, {r.id: i for i, r in enumerate(self.records)}
        seen, self._seen_accuracy = self._seen_accuracy, {}
        (most,) = all_reduce_max([len(seen)], dist)
        rows = torch.full((int(most), 2), -1.0, dtype=torch.float64, device=self.run.device)
        for j, (record_id, accuracy) in enumerate(seen.items()):
            rows[j, 0], rows[j, 1] = index[record_id], accuracy
        every = all_gather_rows(rows, dist).cpu().tolist()
        self.difficulty.update({self.records[int(i)].id: a for i, a in every if i >= 0})

    def checkpoint_state(self) -> dict:
        state = {"cursor": self.stream.cursor, "l_ref": self.l_ref,
                 "weight_version": self.weight_version}
        if self.difficulty is not None:
            state["difficulty"] = self.difficulty.state()
        return state

    def postfix(self, stats: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{stats['reward/total']:.3f}",
                "length": f"{stats['response_tokens']:.0f}"}

    def step(self, step: int) -> dict[str, float]:
        """One rollout batch and its updates; the stats are averaged over ranks."""
        began = time.perf_counter()
        if self.config.rollout.source == "engine":
            self.wake_engine()
        groups, scores, stats = self.collect()
        self.sleep_engine()
        if self.difficulty is not None:
            self.merge_accuracies()
            stats |= self.difficulty.stats()
            stats["difficulty/fallback"] = float(self.difficulty_fallbacks > 0)
            self.difficulty_fallbacks = 0
        self.update_stats = []
        if not groups:  # every group was uninformative: nothing to learn from this step
            stats |= {"reward/total": 0.0, "response_tokens": 0.0, "skipped": 1.0}
        else:
            flat = [r for g in groups for r in g]
            breakdown = [b for s in scores for b in s]
            advantages = self.advantages(torch.tensor([b.total for b in breakdown]))
            stats |= reward_stats(breakdown,
                                  length_needs_correct=self.config.reward.length_needs_correct)
            stats["response_tokens"] = statistics.fmean(len(r.completion_ids) for r in flat)
            train_began = time.perf_counter()
            stats |= self.update(flat, advantages)
            stats["train_s"] = time.perf_counter() - train_began
            tokens = float(sum(len(r.completion_ids) for r in flat))
            stats["tokens_per_s"] = tokens / (time.perf_counter() - began)
        dist = self.run.dist
        if dist.world_size > 1:  # the engine's copy follows the policy, a tensor at a time
            copy_into_unsharded(self.run.model, self.rollout_model)
            keys = sorted(stats)
            stats = dict(zip(keys, (v / dist.world_size
                                    for v in all_reduce_sum([stats[k] for k in keys], dist))))
        if self.pool is not None and groups:  # the servers follow the updated policy
            self.weight_version = str(int(self.weight_version) + 1)
            stats |= self.push_weights()
        return stats

    def finish(self) -> None:
        """Stop sampling ahead, leave the weight-sync group, close the connections."""
        if self.ahead is not None:
            self.ahead.close()
        if self.pusher is not None:
            self.pusher.close()
        if self.pool is not None:
            self.pool.close()

    def push_weights(self) -> dict[str, float]:
        """Push the policy as ``weight_version`` from rank 0 (a collective: every rank
        calls it, and none samples again before the servers hold it); rank 0's stats."""
        from livethinking.engine.weight_update import hf_state_items
        from livethinking.model.checkpoint import save_checkpoint

        run, dist = self.run, self.run.dist
        state = full_state_dict(run.model, dist, dtype=run.dtype) if dist.world_size > 1 \
            else None
        stats = {"push_s": 0.0, "push_gb": 0.0, "push_gb_per_s": 0.0, "push_servers": 0.0}
        if dist.rank == 0:
            model_config = run.model.config
            items = state.items() if state is not None else run.model.named_parameters()
            named = list(hf_state_items(items, tie_word_embeddings=bool(
                model_config.tie_word_embeddings)))

            def save(path):
                weights = state if state is not None else run.model.state_dict()
                return save_checkpoint(weights, model_config.to_dict(), path)

            result = self.pusher.push(named, self.weight_version, save=save)
            stats = {"push_s": result.seconds, "push_gb": result.nbytes / 1e9,
                     "push_gb_per_s": result.gb_per_s, "push_servers": float(len(result.servers))}
        all_reduce_sum([0.0], dist)  # nobody samples before the push landed
        return stats | self.pool.stats()

    # ------------------------------------------------------------------ the step's parts
    def rollouts(self, picks: list[tuple[int, int]]):
        """One group per (record index, cursor) pick; seeds are functions of the cursor."""
        config, tokenizer = self.config, self.run.tokenizer
        chosen = [self.records[i] for i, _ in picks]
        prompts = [self.task.prompt_ids(tokenizer, r) for r in chosen]
        seeds = [config.run.seed * 1000003 + cursor for _, cursor in picks]
        routes = config.loss.routing_replay == "rollout" and self.llm.engine.runner.records_routes
        if config.rollout.source == "engine":
            return engine_rollouts(self.llm, chosen, prompts, config.rollout, seeds,
                                   routes=routes)
        if config.rollout.source == "servers":
            return server_rollouts(self.pool, chosen, prompts, config.rollout, seeds,
                                   eos_token_ids=set(self.llm.engine.eos_ids), routes=routes)
        return openai_rollouts(tokenizer, chosen, prompts, config.rollout, seeds)

    def collect(self):
        """(groups, their reward breakdowns, stats). Under data parallelism every rank draws
        the same prompt picks (the cursor advances alike) and keeps every world_size-th;
        ranks then agree on the smallest group count so their FSDP collectives match."""
        if self.ahead is not None:
            return self.collect_ahead()
        began = time.perf_counter()
        config, dist = self.config, self.run.dist
        world, rank = dist.world_size, dist.rank
        groups, scores, dropped, rounds = [], [], 0, 0
        generate_s = reward_s = 0.0
        want = config.prompts_per_step // world
        while rounds <= config.max_refill_rounds:
            (missing,) = all_reduce_max([want - len(groups)], dist)
            if missing <= 0:
                break
            picks = self.take(int(missing) * world)[rank::world]
            started = time.perf_counter()
            drawn = self.rollouts(picks)
            generate_s += time.perf_counter() - started
            for group in drawn:
                started = time.perf_counter()
                breakdown = self.score(group)
                reward_s += time.perf_counter() - started
                if breakdown is None:
                    dropped += 1
                    continue
                if len(groups) < want:
                    groups.append(group)
                    scores.append(breakdown)
            rounds += 1
        (keep,) = all_reduce_min([len(groups)], dist)
        stats = {"groups_dropped": dropped, "refill_rounds": rounds - 1,
                 "rollout_s": time.perf_counter() - began, "generate_s": generate_s,
                 "reward_s": reward_s}
        return groups[:int(keep)], scores[:int(keep)], stats

    def score(self, group):
        """The group's reward breakdowns, or None when dynamic sampling drops it (every
        reward equal: no advantage to learn from)."""
        breakdown = self.reward_fn.score_many([r.record for r in group], [r.text for r in group],
                                              [len(r.completion_ids) for r in group])
        if self.difficulty is not None:  # the group's accuracy, for the online estimate
            self._seen_accuracy[group[0].record.id] = statistics.fmean(
                b.correctness >= 1.0 for b in breakdown)
        totals = [b.total for b in breakdown]
        if self.config.dynamic_sampling and max(totals) - min(totals) < 1e-9:
            return None
        return breakdown

    def collect_ahead(self):
        """`collect` from the batches sampled ahead: groups with a sample more than
        ``max_staleness`` versions behind the policy are dropped (``groups_stale``); the
        rest are scored and filtered as usual. Stats add the staleness histogram
        (``staleness/d``: the fraction of kept samples d versions old) and both sides' idle
        seconds. Under data parallelism each rank takes its share from its own producer and
        all keep as many groups as the rank with the fewest."""
        began = time.perf_counter()
        config, k, dist = self.config, self.config.rollout.max_staleness, self.run.dist
        current = int(self.weight_version)
        want = config.prompts_per_step // dist.world_size
        groups, scores, dropped, stale, waited, rounds = [], [], 0, 0, 0.0, 0
        lags: list[list[int]] = []  # per kept group
        while len(groups) < want and rounds <= config.max_refill_rounds:
            batch, wait = self.ahead.get()
            waited, rounds = waited + wait, rounds + 1
            for group in batch:
                group_lags = [current - _version(r.weight_version, current) for r in group]
                if max(group_lags) > k:
                    stale += 1
                    continue
                breakdown = self.score(group)
                if breakdown is None:
                    dropped += 1
                    continue
                if len(groups) < want:
                    groups.append(group)
                    scores.append(breakdown)
                    lags.append(group_lags)
        (keep,) = all_reduce_min([len(groups)], dist)
        groups, scores = groups[:int(keep)], scores[:int(keep)]
        kept = [lag for group_lags in lags[:int(keep)] for lag in group_lags]
        stats = {"groups_dropped": dropped, "groups_stale": stale, "refill_rounds": rounds - 1,
                 "rollout_s": time.perf_counter() - began, "trainer_idle_s": waited,
                 "rollout_busy_s": self.ahead.producer_busy_s,
                 "rollout_idle_s": self.ahead.producer_idle_s}
        stats |= {f"staleness/{d}": kept.count(d) / max(1, len(kept)) for d in range(k + 1)}
        return groups, scores, stats

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """rewards (n,) of this rank's groups -> advantages (n,) on the device, computed on
        the global batch (every rank's rewards gathered, in rank order; all ranks hold the
        same n) and sliced back to this rank's rows."""
        dist, config = self.run.dist, self.config
        local = rewards.to(self.run.device, torch.float32)  # (n,)
        every = all_gather_rows(local, dist)  # (world·n,)
        advantages = ops.group_advantages(every, config.rollout.group_size,
                                          scale=config.loss.advantage_scale)
        n = local.shape[0]
        return advantages[dist.rank * n:(dist.rank + 1) * n]

    def update(self, rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """``updates_per_batch`` optimizer steps over minibatches of whole groups (a seeded
        order). Old log-probs: none (on-policy) for one update of engine rollouts; else
        computed once, before the first update. External rollouts' sampler log-probs give
        the importance weights of ``rollout.correction`` on every update (and its
        ``rollout_is/*`` diagnostics: train–inference KL, |Δ log-prob|, capped/masked)."""
        config, run = self.config, self.run
        model, G = run.model, config.rollout.group_size
        batch = build_batch(rollouts, run.device)
        external = config.rollout.source != "engine"
        old = None
        replay_old = config.loss.routing_replay == "old"
        replayed = {}
        mc = model.config
        if config.loss.routing_replay == "rollout" and mc.num_experts > 0:  # R3
            layers = sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers))
            batch.routed_experts, filled = rollout_routes(
                rollouts, batch, layers, mc.num_experts_per_tok,
                lambda: self._logprobs(model, batch, return_routes=True)[1])
            replayed = {"routing_replay_filled": filled}
        if config.updates_per_batch > 1 or external:
            if config.rollout.deterministic and not external and batch.sampler_logprobs is not None:
                old = batch.sampler_logprobs  # the engine reported the trainer's own numbers
                if replay_old:
                    _, batch.routed_experts = self._logprobs(model, batch, return_routes=True)
            else:
                old = self._logprobs(model, batch, return_routes=replay_old)
                if replay_old:
                    old, batch.routed_experts = old
        # on-policy with one update: the forward's own routes are the old policy's (R2 = none)
        is_weights, correction = None, {}
        if external and batch.sampler_logprobs is not None:
            c = config.rollout.correction
            is_weights, diagnostics = ops.rollout_correction(
                old, batch.sampler_logprobs, batch.mask, mode=c.mode, cap=c.cap, low=c.low,
                high=c.high)
            correction = diagnostics.as_dict()
        ref = self._logprobs(self.reference, batch) if self.reference is not None else None
        num_groups = len(rollouts) // G
        order = torch.randperm(num_groups,
                               generator=torch.Generator().manual_seed(self.stream.cursor))
        self.update_stats = []
        for chosen in torch.tensor_split(order, min(config.updates_per_batch, num_groups)):
            rows = (chosen[:, None] * G + torch.arange(G)).reshape(-1).to(run.device)
            result = self._minibatch_backward(batch, rows, advantages, old, ref, is_weights)
            self.update_stats.append(result | run.optimizer.step())
        return {key: statistics.fmean(s[key] for s in self.update_stats)
                for key in self.update_stats[0]} | correction | replayed


    def _logprobs(self, model, batch, *, return_routes: bool = False):
        """`completion_logprobs` in microbatches of ``micro_batch_tokens``, as many forwards
        on every rank."""
        lengths = (batch.window[:, 0] + 1 + batch.mask.sum(-1).long()).tolist()
        groups = micro_batches(lengths, self.config.micro_batch_tokens)
        (count,) = all_reduce_max([len(groups)], self.run.dist)
        out = completion_logprobs(model, batch, self.config.rollout.temperature,
                                  return_routes=return_routes, groups=groups,
                                  num_forwards=int(count))
        if self.run.dist.world_size > 1:  # no backward follows: free the gathered root
            reshard(model)
        return out

    def _minibatch_backward(self, batch, rows, advantages, old, ref, is_weights
                            ) -> dict[str, float]:
        """Gradients of one minibatch's loss, accumulated over microbatches of at most
        ``micro_batch_tokens`` padded tokens, each scaled to its share so the sum is the
        minibatch's loss (`micro_loss_scale`; dapo/cispo divide every microbatch by the
        minibatch's token count). Every rank runs as many microbatches as the rank with the
        most (zero-weight fillers), so FSDP's collectives stay in step. The balance loss is
        each microbatch's own, weighted by its share of the rows. Stats: ``loss`` summed,
        the rest averaged weighted by tokens."""
        config, run = self.config, self.run
        dist, loss_cfg = run.dist, config.loss
        lengths = (batch.window[rows, 0] + 1 + batch.mask[rows].sum(-1).long()).tolist()
        groups = micro_batches(lengths, config.micro_batch_tokens)
        (count,) = all_reduce_max([len(groups)], dist)
        total_rows, total_tokens = len(lengths), float(batch.mask[rows].sum())
        items = total_tokens
        if dist.world_size > 1:  # FSDP averages over ranks: the global count / world
            (tokens,) = all_reduce_sum([total_tokens], dist)
            items = tokens / dist.world_size
        sums: dict[str, float] = {}
        weight_sum = 0.0
        for k in range(int(count)):
            filler = k >= len(groups)
            index = rows[torch.tensor(groups[0] if filler else groups[k], device=rows.device)]
            micro = trim(batch.rows(index))
            comp = micro.mask.shape[1]
            pick = (lambda t: None if t is None else t[index][:, :comp])
            tokens = float(micro.mask.sum())
            scale = 0.0 if filler else micro_loss_scale(loss_cfg.loss_type, len(index), tokens,
                                                        total_rows, total_tokens)
            result = policy_loss_backward(
                run.model, micro, advantages[index], old_logprobs=pick(old),
                ref_logprobs=pick(ref), rollout_is_weights=pick(is_weights), loss=loss_cfg,
                temperature=config.rollout.temperature,
                max_completion_length=config.rollout.max_tokens, num_items_in_batch=items,
                aux_loss=config.aux_loss, loss_scale=scale,
                aux_scale=0.0 if filler else len(index) / total_rows)
            if filler:
                continue
            sums["loss"] = sums.get("loss", 0.0) + result.pop("loss")
            for key, value in result.items():
                sums[key] = sums.get(key, 0.0) + value * tokens
            weight_sum += tokens
        out = {"loss": sums.pop("loss", 0.0), "microbatches": float(len(groups))}
        return out | {key: value / max(weight_sum, 1e-12) for key, value in sums.items()}


def _server_rollouts(config: GRPOConfig, rank: int):
    """The pool of rollout servers, and on rank 0 the pusher of weights to them."""
    import os
    from pathlib import Path

    from livethinking.rollout import ServerPool, VllmWeightPusher, WeightPusher

    rc = config.rollout
    vllm = rc.server_kind == "vllm"
    pool = ServerPool(rc.servers, api_key=rc.api_key or os.environ.get("LIVETHINKING_API_KEY")
                      or None, kind="vllm" if vllm else "sglang")
    pusher = None
    if rank == 0:
        pusher = (VllmWeightPusher if vllm else WeightPusher)(pool=pool, mode=rc.weight_sync,
                              bucket_bytes=max(1, int(rc.bucket_mb * 2**20)),
                              master_address=rc.master_address, master_port=rc.master_port,
                              disk_dir=Path(config.run.output_dir) / "weight-sync")
    return pool, pusher


def _version(label: str | None, default: int) -> int:
    """A server's weight version label as the step count it stands for."""
    try:
        return int(label)
    except (TypeError, ValueError):
        return default
