"""Label-first SFT for the relevance demo: teach a tiny student to emit the tier as its
first response token (``post_cot``), read in one forward (CumPT).

Loss per example (a batch of padded prompts, right padding, causal):

    CE over the four label tokens' logits at the first response position
    + resp_weight · mean CE of the whole post_cot response (label token included, full
      vocabulary): "{k}-{Tier}\\n<think>{the rule's reasoning}</think>" + eos

The 4-way term is the decision CumPT reads; the response term keeps greedy decoding
label-first and, though the reasoning comes after the label, it trains the lookups
(``Its price is 49 dollars, not 39 dollars: mismatch.``) in the same weights the label's
forward uses: with the 4-way term alone the same student reached 49-56 % held-out after
1000 steps (tier 1 right, tier 2 mostly taken for 4), with it 65-68 %. A full-vocabulary
CE on the label token alone never leaves the chance plateau (loss ln 4, one constant
tier) at lr 3e-4..3e-3, even on 28000 queries. Keep the reasoning's first
sentence (the query restated, "with color red and price 39 dollars"): it names each
queried value's attribute, the key to look up; without it held-out accuracy fell from
65-68 % to 56-57 %.
Trained on many cheap synthetic queries (``make_relevance_demo(label_products=...)``)
in the ``query_doc_query`` prompt layout; AdamW, warmup then cosine to 0.1 · lr.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LabelFirstConfig", "train_label_first"]


@dataclass(kw_only=True, slots=True)
class LabelFirstConfig:
    steps: int = 1100
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    resp_weight: float = 0.3
    grad_clip: float = 1.0
    seed: int = 0


def train_label_first(model_path, tokenizer, task, records, out: Path,
                      config: LabelFirstConfig | None = None, *, log=print) -> Path:
    """Train the checkpoint at ``model_path`` on ``records`` (``task``: relevance,
    post_cot, its prompt layout); save to ``out`` (with ``tokenizer``); return ``out``."""
    from livethinking.model import CausalLM
    from livethinking.tasks.relevance import format_response, label_token_ids

    config = config or LabelFirstConfig()
    if task.output_format != "post_cot":
        raise ValueError("label-first SFT trains the post_cot format")
    labels = label_token_ids(tokenizer)
    examples = []
    for r in records:
        prompt = task.prompt_ids(tokenizer, r)
        response = tokenizer.encode(format_response(r.label, r.reference_reasoning or "",
                                                    "post_cot"), add_special_tokens=False)
        examples.append((prompt, response + [tokenizer.eos_token_id], r.label - 1))
    model = CausalLM.from_pretrained(model_path).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                            weight_decay=config.weight_decay)
    label_index = torch.tensor(labels)
    pad = tokenizer.pad_token_id
    rng = random.Random(config.seed)
    order: list[int] = []
    began = time.perf_counter()
    for step in range(config.steps):
        if len(order) < config.batch:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [examples[i] for i in order[:config.batch]], order[config.batch:]
        if step < config.warmup:
            lr = config.lr * (step + 1) / config.warmup
        else:
            progress = (step - config.warmup) / max(1, config.steps - config.warmup)
            lr = config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        width = max(len(p) + len(r) for p, r, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (p, r, _) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            targets[i, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(r)
        mask = targets >= 0
        out_hidden = model.forward_hidden(ids, token_mask=mask)
        hidden = out_hidden.hidden_states
        first = torch.tensor([len(p) - 1 for p, _, _ in batch])
        tier_logits = hidden[torch.arange(len(batch)), first] @ model.lm_head.weight[label_index].T
        loss = torch.nn.functional.cross_entropy(
            tier_logits, torch.tensor([y for _, _, y in batch]))
        response_logits = hidden[mask] @ model.lm_head.weight.T
        loss = loss + config.resp_weight * torch.nn.functional.cross_entropy(
            response_logits, targets[mask])
        if out_hidden.weighted_aux_loss is not None:
            loss = loss + out_hidden.weighted_aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"label-first SFT: step {step + 1}/{config.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - began:.0f} s)")
    model.eval()
    return model.save_pretrained(out, tokenizer=tokenizer)
