"""``livethinking rft``: rejection sampling from a teacher, then SFT of the student.

1. k teacher samples per training prompt; keep those judged correct AND helpful (saved to
   ``output_dir/rft_accepted.jsonl``, reused on resume);
2. pack (prompt, response) pairs into rows; loss on response tokens only, + MoE balance;
3. AdamW on fp32 masters, warmup + cosine, clipping; checkpoints every ``save_every``
   steps (resumable bit for bit on CPU: the row order is a function of the epoch).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from livethinking.data import LivestreamRecord, load_records
from livethinking.train.checkpointing import (checkpoint_collectively, load_trainer_state,
                                              save_final_model, set_rng_state)
from livethinking.train.common import (load_policy, make_judges, prompt_ids, response_ids,
                                       start_run)
from livethinking.train.config import RFTConfig
from livethinking.train.config_io import config_to_dict
from livethinking.train.distributed import all_reduce_sum, end_distributed, shard_model
from livethinking.train.metrics import MetricsLogger, plot_metrics
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.packing import pack_examples
from livethinking.train.sft import sft_step
from livethinking.train.teacher import accept_samples, teacher_responses

__all__ = ["run_rft"]


def _accepted(config: RFTConfig, records, out: Path, reuse: bool, write: bool = True):
    path = out / "rft_accepted.jsonl"
    by_id = {r.id: r for r in records}
    if reuse and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(by_id[r["id"]], r["response"]) for r in rows], {"reused": len(rows)}
    responses = teacher_responses(config.teacher, records, seed=config.run.seed,
                                  system_prompt=config.system_prompt)
    kept, stats = accept_samples(records, responses, make_judges(config.judge),
                                 helpful_threshold=config.helpful_threshold)
    if not write:
        return kept, stats
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"id": r.id, "response": text}) + "\n" for r, text in kept))
    tmp.replace(path)
    return kept, stats


def run_rft(config: RFTConfig, *, resume: bool = False, log=print) -> Path:
    """Run RFT; returns the directory of the final model (Hugging Face format)."""
    start_at = start_run(config.run, config.model, resume=resume)
    out, device, dist, checkpoint = start_at.out, start_at.device, start_at.dist, start_at.checkpoint
    if not dist.is_main:
        log = (lambda *_: None)
    model, tokenizer = load_policy(start_at.policy_path, device, start_at.dtype)
    if dist.world_size > 1:
        shard_model(model, dist)
    records: list[LivestreamRecord] = load_records(config.train_data,
                                                   on_error=config.on_bad_record).items
    kept, sample_stats = _accepted(config, records, out, reuse=checkpoint is not None,
                                   write=dist.is_main)
    log(f"rft: {len(records)} prompts; teacher samples {sample_stats}")
    if not kept:
        raise RuntimeError("no teacher sample was judged correct and helpful: nothing to train on")
    examples = [(prompt_ids(tokenizer, r, config.system_prompt), response_ids(tokenizer, text))
                for r, text in kept]
    rows, truncated = pack_examples(examples, config.row_tokens, seed=config.run.seed)
    steps_per_epoch = math.ceil(len(rows) / config.rows_per_step)
    total = config.max_steps or config.epochs * steps_per_epoch
    optimizer = MasterWeightAdamW(model.parameters(), config.optim, total)
    start = 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        log(f"rft: resumed from {checkpoint} at step {start}")
    log(f"rft: {len(kept)} examples in {len(rows)} rows of {config.row_tokens} tokens "
        f"({truncated} truncated); {total} steps")
    logger = MetricsLogger(out, tensorboard=config.run.tensorboard,
                           resume_step=start if checkpoint is not None else None) \
        if dist.is_main else None
    config_yaml = json.dumps(config_to_dict(config), indent=2)
    progress = _progress(config.run.progress and dist.is_main, total, start, "rft")
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        order = list(range(len(rows)))
        random.Random(config.run.seed * 1000003 + epoch).shuffle(order)
        batch = [rows[i] for i in order[index * config.rows_per_step:
                                         (index + 1) * config.rows_per_step]]
        began = time.perf_counter()
        mine = batch[dist.rank::dist.world_size]  # this rank's rows of the global batch
        (tokens,) = all_reduce_sum([sum(r.num_loss_tokens for r in mine)], dist)
        stats = sft_step(model, mine, device, aux_loss=config.aux_loss, total_tokens=int(tokens),
                         total_rows=len(batch), world_size=dist.world_size)
        stats["loss"], stats["aux_loss"], stats["tokens"] = all_reduce_sum(
            [stats["loss"], stats["aux_loss"], stats["tokens"]], dist)
        stats |= optimizer.step()
        stats["tokens_per_s"] = stats["tokens"] / (time.perf_counter() - began)
        if logger is not None and ((step + 1) % config.run.log_every == 0 or step + 1 == total):
            logger.log(step + 1, stats)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.3f}")
        if config.run.save_every and (step + 1) % config.run.save_every == 0 and step + 1 < total:
            checkpoint_collectively(out, step + 1, model, tokenizer, optimizer, {},
                                    config_yaml, dist)
    if progress is not None:
        progress.close()
    final = save_final_model(out / "final", model, tokenizer, dist)
    end_distributed(dist)  # the last collective is done
    if logger is None:
        return final
    logger.close()
    if config.run.plots:
        plot_metrics(logger.path, out / "plots", {"RFT loss": ["loss", "aux_loss"],
                                                  "RFT grad norm": ["grad_norm"]})
    return final


def _progress(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)
