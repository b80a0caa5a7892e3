"""``livethinking dpo``: direct preference optimisation of an SFT model.

1. pairs: from ``pairs`` (JSON lines) or by pass@N (``train/pairs.py``): rank 0 samples N
   responses per prompt from the starting model through the engine, judges them, keeps
   (correct, wrong) pairs and writes ``pass_at_n.jsonl`` (each prompt's accuracy: the
   offline difficulty estimate for GRPO's ``difficulty.accuracy_file``);
2. reference log-probs: Σ log π_ref(response | prompt) of every chosen and rejected
   response under the starting model, computed once before the first update and saved
   with the pairs in ``dpo_pairs.jsonl`` (a resumed run reads them back);
3. per step, ``pairs_per_step`` pairs of the epoch's seeded order; each forward holds whole
   pairs (chosen and rejected rows) within ``micro_batch_tokens`` padded tokens; per-row
   sums of ``fused_linear_logprobs`` (no N×V logits) feed ``ops.dpo_loss``.

The step's loss is one big batch's, whatever the microbatches and ranks:
  L = (1/P) Σ_pairs ℓ_DPO(pair) + α · (Σ_chosen tokens −log π) / (chosen tokens)
      + (1/F) Σ_forwards aux
with P the step's pairs and F its forwards over all ranks; each microbatch contributes its
pairs' share (n_mb / P) of the DPO mean, and under FSDP (which averages gradients) each
rank's loss is multiplied by the world size. A rank with fewer microbatches than another
runs filler forwards with weight 0, so every rank makes the same FSDP collectives.
"""

from __future__ import annotations

import json
import math
import random
import time

import torch

from livethinking import ops
from livethinking.train.common import response_ids
from livethinking.train.config import DPOConfig
from livethinking.train.distributed import (all_reduce_max, all_reduce_sum,
                                            broadcast_from_main, reshard)
from livethinking.train.grpo_step import build_batch, micro_batches, trim
from livethinking.train.loop import TrainingRun, run_training
from livethinking.train.pairs import PreferencePair, build_pairs, load_pairs, sample_n
from livethinking.train.rollout import Rollout
from livethinking.train.tasks import task_of

__all__ = ["DPOTrainer", "run_dpo"]

PAIRS_FILE, ACCURACY_FILE = "dpo_pairs.jsonl", "pass_at_n.jsonl"


def run_dpo(config: DPOConfig, *, resume: bool = False, log=print):
    """Run DPO; returns the directory of the final model (Hugging Face format)."""
    return run_training(config, DPOTrainer(config), resume=resume, log=log)


def _row_logprobs(model, part, *, aux: bool):
    """Per-row Σ log p of the completion tokens, (rows,) fp32 with grad, the per-row token
    sums (rows,) of the completion log-probs for the NLL term, and the weighted MoE
    balance loss over the completion positions (None without experts or ``aux``)."""
    def head(hidden, weight):
        window = hidden.gather(1, part.window[..., None].expand(-1, -1, hidden.shape[-1]))
        return ops.fused_linear_logprobs(window.reshape(-1, window.shape[-1]), weight,
                                         part.targets.reshape(-1))

    out = model.forward_hidden(part.input_ids, head=head, token_mask=part.loss_positions)
    logp = out.head_output.reshape(part.targets.shape) * part.mask  # (rows, Tc)
    return logp.sum(-1), out.weighted_aux_loss if aux else None


class DPOTrainer:
    """DPO on the run skeleton: ``prepare`` builds (or reads) the pairs and their reference
    log-probs; ``step`` is one optimizer step over ``pairs_per_step`` pairs."""

    name = "dpo"
    plots = {"DPO loss": ["loss"], "implicit reward": ["rewards/chosen", "rewards/rejected",
                                                       "rewards/margins"],
             "implicit reward accuracy": ["rewards/accuracies"], "DPO grad norm": ["grad_norm"]}

    def __init__(self, config: DPOConfig) -> None:
        self.config = config
        self.judge = config.judge
        self.task = task_of(config)
        self.run: TrainingRun | None = None
        self.pairs: list[PreferencePair] = []
        self.rows: list[tuple[Rollout, Rollout]] = []  # (chosen, rejected) token rows
        self.reference: torch.Tensor | None = None  # (pairs, 2) fp32: Σ log π_ref
        self.steps_per_epoch = 1

    # ------------------------------------------------------------------ the skeleton's hooks
    def prepare(self, run: TrainingRun) -> tuple[int, int]:
        config = self.config
        self.run = run
        records = self.task.load(config.train_data, on_error=config.on_bad_record)
        saved = run.out / PAIRS_FILE
        reuse = run.checkpoint is not None and saved.is_file()
        pairs, reference, stats = self._agreed_pairs(records, saved if reuse else None)
        if not pairs:
            raise RuntimeError(f"dpo: no preference pair (pass@N stats {stats}): every prompt's "
                               f"samples were all correct or all wrong")
        self.pairs = pairs
        tokenizer = run.tokenizer
        for pair in pairs:
            prompt = self.task.prompt_ids(tokenizer, pair.record)
            self.rows.append(tuple(Rollout(pair.record, prompt, response_ids(tokenizer, text),
                                           text, None) for text in (pair.chosen, pair.rejected)))
        self.reference = reference if reference is not None else self._reference_logprobs()
        if run.dist.is_main and not reuse:
            self._save_pairs(saved)
        self.steps_per_epoch = math.ceil(len(pairs) / config.pairs_per_step)
        total = config.max_steps or config.epochs * self.steps_per_epoch
        run.log(f"dpo: {len(records)} prompts; {len(pairs)} pairs ({stats}); {total} steps")
        return total, total

    def start(self, state: dict | None) -> None:
        pass  # the pair order is a function of the step

    def checkpoint_state(self) -> dict:
        return {}

    def postfix(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['rewards/accuracies']:.2f}"}

    def step_pairs(self, step: int) -> list[int]:
        """The pair indices of step ``step``: a slice of the epoch's seeded order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.pairs)))
        random.Random(self.config.run.seed * 1000003 + epoch).shuffle(order)
        per_step = self.config.pairs_per_step
        return order[index * per_step:(index + 1) * per_step]

    def step(self, step: int) -> dict[str, float]:
        config, run = self.config, self.run
        dist, device = run.dist, run.device
        began = time.perf_counter()
        batch = self.step_pairs(step)
        mine = batch[dist.rank::dist.world_size]
        groups = self._micro_groups(mine)
        chosen_tokens = sum(len(self.rows[i][0].completion_ids) for i in mine)
        total_tokens, forwards = all_reduce_sum([chosen_tokens, len(groups)], dist)
        (most,) = all_reduce_max([len(groups)], dist)
        sums = dict.fromkeys(("loss", "dpo_loss", "nll", "aux_loss", "rewards/chosen",
                              "rewards/rejected", "rewards/margins", "rewards/accuracies",
                              "logps/chosen", "logps/rejected"), 0.0)
        for k in range(int(most)):
            filler = k >= len(groups)
            group = (groups[0] if groups else batch[:1]) if filler else groups[k]
            weight = 0.0 if filler else 1.0
            rows = [row for i in group for row in self.rows[i]]  # chosen, rejected, ...
            part = trim(build_batch(rows, device))
            logps, aux = _row_logprobs(run.model, part, aux=config.aux_loss)
            chosen, rejected = logps[0::2], logps[1::2]
            ref = self.reference[group].to(device)  # (n, 2)
            dpo, stats = ops.dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=config.beta,
                                      label_smoothing=config.label_smoothing)
            share = len(group) / len(batch)
            nll = -chosen.sum() / max(1, int(total_tokens))
            loss = dpo * share + config.sft_weight * nll
            if aux is not None:
                loss = loss + aux / max(1, int(forwards))
                sums["aux_loss"] += weight * float(aux.detach()) / max(1, int(forwards))
            (loss * (dist.world_size * weight)).backward()
            sums["dpo_loss"] += weight * float(dpo.detach()) * share
            sums["nll"] += weight * float(nll.detach())
            for key, value in stats.items():
                if key in sums:
                    sums[key] += weight * float(value) * share
        keys = sorted(sums)
        out = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], dist)))
        out["loss"] = out["dpo_loss"] + config.sft_weight * out["nll"] + out["aux_loss"]
        out["pairs"] = float(len(batch))
        out |= run.optimizer.step()
        out["pairs_per_s"] = len(batch) / (time.perf_counter() - began)
        return out

    # ------------------------------------------------------------------ the parts
    def _micro_groups(self, pair_indices: list[int]) -> list[list[int]]:
        """Consecutive groups of whole pairs whose padded rows fit ``micro_batch_tokens``
        (a pair is two rows as long as its longer one)."""
        lengths = []
        for i in pair_indices:
            chosen, rejected = self.rows[i]
            lengths.append(max(len(r.prompt_ids) + len(r.completion_ids)
                               for r in (chosen, rejected)))
        # a group of g pairs pads 2g rows to its longest: budget halves per pair
        return [[pair_indices[j] for j in group]
                for group in micro_batches(lengths, self.config.micro_batch_tokens // 2)]

    @torch.no_grad()
    def _reference_logprobs(self) -> torch.Tensor:
        """(pairs, 2) Σ log π_ref of chosen and rejected under the starting model (the
        policy before its first update). Every rank computes every pair (the same forwards
        on every rank, as FSDP needs)."""
        run = self.run
        was_training = run.model.training
        run.model.eval()
        out = torch.zeros(len(self.rows), 2, dtype=torch.float32)
        for group in self._micro_groups(list(range(len(self.rows)))):
            rows = [row for i in group for row in self.rows[i]]
            logps, _ = _row_logprobs(run.model, trim(build_batch(rows, run.device)), aux=False)
            out[group] = logps.float().cpu().reshape(-1, 2)
        run.model.train(was_training)
        if run.dist.world_size > 1:  # no backward follows these forwards
            reshard(run.model)
        return out

    def _agreed_pairs(self, records, saved):
        """(pairs, reference log-probs or None, stats) decided on rank 0 and broadcast:
        read back from ``saved``, read from ``config.pairs``, or built by pass@N."""
        run = self.run
        payload = None
        if run.dist.is_main:
            try:
                payload = (*self._main_pairs(records, saved), None)
            except Exception as error:  # release the ranks waiting for the broadcast
                broadcast_from_main(([], None, {}, f"{type(error).__name__}: {error}"),
                                    run.dist)
                raise
            payload = ([(p.record.id, p.chosen, p.rejected) for p in payload[0]],
                       *payload[1:])
        rows, reference, stats, error = broadcast_from_main(payload, run.dist)
        if error is not None:
            raise RuntimeError(f"rank 0 failed to build the preference pairs: {error}")
        by_id = {r.id: r for r in records}
        pairs = [PreferencePair(by_id[i], chosen, rejected) for i, chosen, rejected in rows]
        return pairs, None if reference is None else torch.tensor(reference), stats

    def _main_pairs(self, records, saved):
        config = self.config
        if saved is not None:
            rows = [json.loads(line) for line in saved.read_text().splitlines() if line]
            by_id = {r.id: r for r in records}
            pairs = [PreferencePair(by_id[r["id"]], r["chosen"], r["rejected"]) for r in rows]
            return pairs, [[r["ref_chosen"], r["ref_rejected"]] for r in rows], {
                "reused": len(rows)}
        if config.pairs is not None:
            pairs = load_pairs(config.pairs, records)
            return pairs, None, {"read": len(pairs)}
        from livethinking.engine import LLM

        s, run = config.sampling, self.run
        # one process: the engine shares the policy's tensors; under FSDP rank 0 loads a copy
        shared = run.dist.world_size == 1
        llm = LLM(run.model.eval(), run.tokenizer) if shared else \
            LLM(str(run.policy_path), run.tokenizer, device=run.device, dtype=run.dtype)
        prompts = [self.task.prompt_ids(run.tokenizer, r) for r in records]
        samples = sample_n(llm, prompts, records, n=s.n, temperature=s.temperature,
                           top_p=s.top_p, max_tokens=s.max_tokens, seed=config.run.seed)
        del llm
        if shared:
            run.model.train()
        correctness, _ = self.task.judges(config.judge)
        pairs, stats, accuracy = build_pairs(records, samples, correctness,
                                             pairs_per_prompt=s.pairs_per_prompt)
        from livethinking.data import write_text_atomic

        write_text_atomic(run.out / ACCURACY_FILE, "".join(
            json.dumps({"id": i, "accuracy": a, "n": s.n}) + "\n" for i, a in accuracy.items()))
        return pairs, None, stats

    def _save_pairs(self, path) -> None:
        from livethinking.data import write_text_atomic

        write_text_atomic(path, "".join(json.dumps({
            "id": p.record.id, "chosen": p.chosen, "rejected": p.rejected,
            "ref_chosen": float(ref[0]), "ref_rejected": float(ref[1])}) + "\n"
            for p, ref in zip(self.pairs, self.reference.tolist())))
