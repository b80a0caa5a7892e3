"""The demo's stand-in for the student's pre-training: a short language-modelling pass on the
training catalogue (``pretrain.jsonl`` from :func:`~livethinking.tasks.livestream.make_demo`:
each training product's document followed by questions and short answers), so the tiny
random student learns to read a ``key: value`` document and copy the asked value before
RFT teaches it the teacher's reasoning format.

A real student arrives pre-trained; the demo's starts random and would otherwise only
memorise its training products. Held-out products never enter this corpus.

loss = −Σ_{text tokens after the first} log p(token) / (those tokens in the step)
       + MoE balance loss (:func:`livethinking.train.sft.sft_step`); AdamW, warmup + cosine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from livethinking.train.config import OptimConfig
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.packing import pack_examples
from livethinking.train.sft import sft_step

__all__ = ["PretrainConfig", "pretrain_on_catalogue", "pretrain_student"]


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """The pre-training pass: ``epochs`` over the catalogue texts packed into rows of
    ``row_tokens``, ``rows_per_step`` rows per AdamW step."""

    epochs: int = 1
    row_tokens: int = 512
    rows_per_step: int = 2  # many small steps: the copy lookup emerges after ~1000 steps
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5e-3, warmup_steps=20, min_lr_ratio=0.1, grad_clip=1.0))
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "row_tokens", "rows_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def pretrain_student(student: str | Path, texts: list[str], out_dir: str | Path,
                     config: PretrainConfig, *, progress: bool = False, log=print) -> Path:
    """Load the student checkpoint ``student`` (with its tokenizer), run
    :func:`pretrain_on_catalogue` on ``texts``, save it to ``out_dir``; returns ``out_dir``."""
    import transformers

    from livethinking.model import CausalLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    model = CausalLM.from_pretrained(student)
    pretrain_on_catalogue(model, tokenizer, texts, config, progress=progress, log=log)
    return model.save_pretrained(out_dir, tokenizer=tokenizer)


def pretrain_on_catalogue(model, tokenizer, texts: list[str], config: PretrainConfig, *,
                          progress: bool = False, log=print) -> dict[str, float]:
    """Train ``model`` in place on ``texts`` (each followed by eos; every token after the
    first is a target); returns the step count, the mean loss of the first and last ten
    steps and the seconds taken. ``progress``: a tqdm bar with ETA."""
    if not texts:
        raise ValueError("texts must hold at least one catalogue text")
    examples = []
    for text in texts:  # (first token, the rest)
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        examples.append((ids[:1], ids[1:]))
    rows, truncated = pack_examples(examples, config.row_tokens, seed=config.seed)
    per_epoch = -(-len(rows) // config.rows_per_step)
    total = config.epochs * per_epoch
    log(f"pretrain: {len(texts)} catalogue texts in {len(rows)} rows of {config.row_tokens} "
        f"tokens ({truncated} truncated); {total} steps")
    device = next(model.parameters()).device
    model.train()
    optimizer = MasterWeightAdamW(model.parameters(), config.optim, total)
    generator = torch.Generator().manual_seed(config.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pretrain", unit="step", dynamic_ncols=True)
    began, losses = time.perf_counter(), []
    for _ in range(config.epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(rows), config.rows_per_step):
            stats = sft_step(model, [rows[i] for i in order[start:start + config.rows_per_step]],
                             device)
            optimizer.step()
            losses.append(stats["loss"])
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    first, last = losses[:10], losses[-10:]
    result = {"steps": float(total), "first_loss": sum(first) / len(first),
              "last_loss": sum(last) / len(last), "seconds": time.perf_counter() - began}
    log(f"pretrain: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} in "
        f"{result['seconds']:.0f} s")
    return result
