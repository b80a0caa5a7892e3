"""One relevance stage measured on held-out records: the label read from a full decode, the
label read by CumPT from the first response token's distribution (τ calibrated on a dev
split for macro-F1), and the latency of each reading.

Decoded: greedy answer (label first, then reasoning, ``post_cot``; or reasoning then label,
``cot``), label parsed; accuracy and macro-F1 over the parsed labels (an unparseable answer
is wrong: it counts as predicting no tier). CumPT (``post_cot`` only): one forward over the
prompt; p = softmax over the four label tokens' logits at the first response position;
tier = cumpt(p, τ). Latency: label first = TTFT (a prefill and one token); full CoT =
TTFT + tokens × TPOT (median TTFT and TPOT of single-request probes, as ``evaluate``).
"""

from __future__ import annotations

import statistics

import torch

from livethinking.train.common import evaluate

__all__ = ["label_probabilities", "measure_relevance_stage"]


@torch.no_grad()
def label_probabilities(model, tokenizer, task, records, *, progress=None) -> torch.Tensor:
    """(records, 4) p(tier k | prompt) over the label tokens at the first response position."""
    from livethinking.tasks.relevance import label_distribution, label_token_ids

    ids = label_token_ids(tokenizer)
    out = []
    for record in records:
        prompt = torch.tensor([task.prompt_ids(tokenizer, record)])
        logits = model(prompt)[0, -1]  # (V,) logits of the first response token
        out.append(label_distribution(logits.float(), ids))
        if progress is not None:
            progress.update(1)
    return torch.stack(out) if out else torch.zeros(0, 4)


def measure_relevance_stage(path, label: str, tokenizer, task, dev, heldout, *,
                            max_tokens: int, examples: int = 2, progress: bool = False) -> dict:
    """A stage's row: ``accuracy`` / ``macro_f1`` of the decoded labels, ``format`` (the
    format judge's mean), ``tokens_per_response``; with ``post_cot`` also ``cumpt_tau``,
    ``cumpt_accuracy``, ``cumpt_macro_f1`` and ``argmax_accuracy`` (τ-free: the likeliest
    label token); ``ttft_ms``, ``tpot_ms``, ``label_first_ms`` and ``full_cot_ms``; a few
    example answers (the same records for every stage)."""
    from livethinking.model import CausalLM
    from livethinking.tasks.relevance import (accuracy, calibrate_tau, cumpt, macro_f1,
                                              parse_label)
    from livethinking.train.config import JudgeConfig

    model = CausalLM.from_pretrained(path).eval()
    post_cot = task.output_format == "post_cot"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(heldout) + (len(dev) + len(heldout)) * post_cot,
                   desc=f"evaluate ({label})", unit="record", dynamic_ncols=True)
    try:
        result = evaluate(model, tokenizer, heldout, task.judges(JudgeConfig()),
                          max_tokens=max_tokens, prompt=task.prompt_ids)
        if bar is not None:
            bar.update(len(heldout))
        gold = torch.tensor([r.label for r in heldout])
        decoded = torch.tensor([parse_label(t, task.output_format) or 0
                                for t in result.responses])  # 0: no label
        row = {"model": label, "accuracy": accuracy(decoded, gold),
               "macro_f1": macro_f1(decoded, gold), "format": result.helpful,
               "tokens_per_response": result.tokens_per_response, "ttft_ms": result.ttft_ms,
               "tpot_ms": result.tpot_ms, "label_first_ms": result.ttft_ms,
               "full_cot_ms": result.ttft_ms + result.tokens_per_response * result.tpot_ms}
        if post_cot:
            dev_p = label_probabilities(model, tokenizer, task, dev, progress=bar)
            tau, dev_f1 = calibrate_tau(dev_p, torch.tensor([r.label for r in dev]))
            probs = label_probabilities(model, tokenizer, task, heldout, progress=bar)
            tiers = cumpt(probs, tau)
            row |= {"cumpt_tau": tau, "cumpt_dev_macro_f1": dev_f1,
                    "cumpt_accuracy": accuracy(tiers, gold), "cumpt_macro_f1": macro_f1(tiers, gold),
                    "argmax_accuracy": accuracy(probs.argmax(-1) + 1, gold)}
    finally:
        if bar is not None:
            bar.close()
    picks = sorted({i * len(heldout) // examples for i in range(examples)}) if examples else []
    row["examples"] = [{"id": heldout[i].id, "query": heldout[i].query, "label": heldout[i].label,
                        "answer": result.responses[i]} for i in picks]
    row["decoded_unparseable"] = statistics.fmean(float(d == 0) for d in decoded.tolist()) \
        if len(heldout) else 0.0
    return row
