"""``livethinking rft``: rejection sampling from a teacher, then SFT of the student.

1. k teacher samples per training prompt; keep those judged correct AND helpful (saved to
   ``output_dir/rft_accepted.jsonl``, reused on resume);
2. pack (prompt, response) pairs into rows; loss on response tokens only, + MoE balance
   (counted on the response tokens too); ``lm_data`` texts, when given, join the same rows
   as plain language modelling (every token after a text's first is a target);
3. AdamW on fp32 masters, warmup + cosine, clipping; checkpoints every ``save_every``
   steps (resumable bit for bit on CPU: the row order is a function of the epoch).

Under torchrun every rank trains on one agreed set: rank 0 alone samples the teacher and
judges (or reads the saved set on resume) and broadcasts the accepted pairs. A step's rows
are dealt round robin over ranks; a rank left with fewer rows than the others (a row count
not a multiple of the world size, the last partial batch) runs the missing forwards and
backwards on a filler row with weight 0, so every rank makes the same FSDP collectives.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from livethinking.data import load_texts, write_text_atomic
from livethinking.train.common import response_ids
from livethinking.train.config import JudgeConfig, RFTConfig
from livethinking.train.distributed import all_reduce_sum, broadcast_from_main
from livethinking.train.loop import TrainingRun, run_training
from livethinking.train.packing import pack_examples
from livethinking.train.sft import sft_step
from livethinking.train.tasks import task_of
from livethinking.train.teacher import accept_samples, teacher_responses

__all__ = ["RFTTrainer", "run_rft"]


def _accepted(config: RFTConfig, records, out: Path, reuse: bool):
    path = out / "rft_accepted.jsonl"
    by_id = {r.id: r for r in records}
    if reuse and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(by_id[r["id"]], r["response"]) for r in rows], {"reused": len(rows)}
    task = task_of(config)
    responses = teacher_responses(config.teacher, records, seed=config.run.seed,
                                  progress=config.run.progress, task=task)
    kept, stats = accept_samples(records, responses, task.judges(config.judge),
                                 helpful_threshold=config.helpful_threshold)
    write_text_atomic(path, "".join(json.dumps({"id": r.id, "response": text}) + "\n"
                                    for r, text in kept))
    return kept, stats


def _agreed_accepted(config: RFTConfig, records, run: TrainingRun, reuse: bool):
    """The accepted (record, response) pairs and the sampling stats, decided on rank 0 and
    broadcast (a collective); an error on rank 0 is raised on every rank."""
    payload = None
    if run.dist.is_main:
        try:
            kept, stats = _accepted(config, records, run.out, reuse=reuse)
            payload = ([(r.id, text) for r, text in kept], stats, None)
        except Exception as error:  # release the other ranks waiting for the broadcast
            broadcast_from_main(([], {}, f"{type(error).__name__}: {error}"), run.dist)
            raise
    pairs, stats, error = broadcast_from_main(payload, run.dist)
    if error is not None:
        raise RuntimeError(f"rank 0 failed to build the accepted set: {error}")
    by_id = {r.id: r for r in records}
    return [(by_id[i], text) for i, text in pairs], stats


def run_rft(config: RFTConfig, *, resume: bool = False, log=print) -> Path:
    """Run RFT; returns the directory of the final model (Hugging Face format)."""
    return run_training(config, RFTTrainer(config), resume=resume, log=log)


class RFTTrainer:
    """RFT on the run skeleton: ``prepare`` builds the accepted set and packs it into rows;
    ``step`` is one optimizer step over ``rows_per_step`` rows (the epoch's seeded order)."""

    name = "rft"
    plots = {"RFT loss": ["loss", "aux_loss"], "RFT grad norm": ["grad_norm"]}

    def __init__(self, config: RFTConfig) -> None:
        self.config = config
        self.judge = getattr(config, "judge", None) or JudgeConfig()  # agent SFT has none
        self.run: TrainingRun | None = None
        self.rows: list = []
        self.steps_per_epoch = 1

    def prepare(self, run: TrainingRun) -> tuple[int, int]:
        config = self.config
        self.run = run
        task = task_of(config)
        records = task.load(config.train_data, on_error=config.on_bad_record)
        kept, sample_stats = _agreed_accepted(config, records, run,
                                                     reuse=run.checkpoint is not None)
        run.log(f"rft: {len(records)} prompts; teacher samples {sample_stats}")
        if not kept:
            raise RuntimeError("no teacher sample was judged correct and helpful: nothing to "
                               "train on")
        examples = [(task.prompt_ids(run.tokenizer, r),
                     response_ids(run.tokenizer, text)) for r, text in kept]
        texts = [] if config.lm_data is None else load_texts(config.lm_data).items
        for text in texts:  # (first token, the rest): every token after the first trained
            ids = run.tokenizer.encode(text, add_special_tokens=False)
            examples.append((ids[:1], ids[1:] + [run.tokenizer.eos_token_id]))
        self.rows, truncated = pack_examples(examples, config.row_tokens, seed=config.run.seed)
        self.steps_per_epoch = math.ceil(len(self.rows) / config.rows_per_step)
        total = config.max_steps or config.epochs * self.steps_per_epoch
        mixed = (f" + {len(texts)} language-modelling texts from {config.lm_data}"
                 if texts else "")
        run.log(f"rft: {len(kept)} accepted samples{mixed} in {len(self.rows)} rows of "
                f"{config.row_tokens} tokens ({truncated} truncated); {total} steps")
        return total, total

    def start(self, state: dict | None) -> None:
        pass  # the row order is a function of the step: nothing else to restore

    def checkpoint_state(self) -> dict:
        return {}

    def postfix(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss']:.3f}"}

    def step_rows(self, step: int) -> list:
        """The global batch of step ``step``: a slice of the epoch's seeded row order (the
        epoch's last batch may be shorter)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.rows)))
        random.Random(self.config.run.seed * 1000003 + epoch).shuffle(order)
        per_step = self.config.rows_per_step
        return [self.rows[i] for i in order[index * per_step:(index + 1) * per_step]]

    def step(self, step: int) -> dict[str, float]:
        config, run = self.config, self.run
        dist = run.dist
        batch = self.step_rows(step)
        began = time.perf_counter()
        mine = batch[dist.rank::dist.world_size]  # this rank's rows of the global batch
        forwards = math.ceil(len(batch) / dist.world_size)  # the same on every rank
        (tokens,) = all_reduce_sum([sum(r.num_loss_tokens for r in mine)], dist)
        stats = sft_step(run.model, mine, run.device, aux_loss=config.aux_loss,
                         total_tokens=int(tokens), total_rows=len(batch),
                         world_size=dist.world_size,
                         filler_rows=[batch[0]] * (forwards - len(mine)))
        stats["loss"], stats["aux_loss"], stats["tokens"] = all_reduce_sum(
            [stats["loss"], stats["aux_loss"], stats["tokens"]], dist)
        stats["rows"] = float(len(batch))
        stats |= run.optimizer.step()
        stats["tokens_per_s"] = stats["tokens"] / (time.perf_counter() - began)
        return stats
