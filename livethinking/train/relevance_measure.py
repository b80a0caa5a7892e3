"""One relevance stage measured on held-out records: the label read from a full decode, the
label read by CumPT from the label token's distribution (τ calibrated on a dev split for
macro-F1), and the latency of each reading.

Decoded: greedy answer (label first, then reasoning, ``post_cot``; or reasoning then label,
``cot``), label parsed; accuracy and macro-F1 over the parsed labels (an unparseable answer
is wrong: it counts as predicting no tier). CumPT: p = softmax over the four label tokens'
logits at the label's position, tier = cumpt(p, τ). ``post_cot``: the first response
position, one forward over the prompt (no reasoning decoded). ``cot``: the position after
the greedy reasoning — one forward over prompt + the decoded text through ``</think>\n``
(``</think>\n`` appended when the answer never closed its think block: a forced answer).
Latency: label first = TTFT (a prefill and one token); full CoT = TTFT + tokens × TPOT
(median TTFT and TPOT of single-request probes, as ``evaluate``).
"""

from __future__ import annotations

import statistics

import torch

from livethinking.train.common import evaluate

__all__ = ["label_probabilities", "measure_relevance_stage", "reasoning_prefix"]


THINK_END = "</think>\n"  # what precedes the label in a cot response


def reasoning_prefix(response: str) -> str:
    """The part of a cot ``response`` before its label: through the first ``</think>`` and
    the newline after it; ``response + "</think>\\n"`` when it has no ``</think>``."""
    end = response.find("</think>")
    return response + THINK_END if end < 0 else response[:end] + THINK_END


@torch.no_grad()
def label_probabilities(model, tokenizer, task, records, *, responses=None,
                        progress=None) -> torch.Tensor:
    """(records, 4) p(tier k | context) over the label tokens at the label's position:
    ``post_cot``, the first response position; ``cot``, after ``reasoning_prefix`` of each
    of ``responses`` (the decoded answers, one per record; required for cot)."""
    from livethinking.tasks.relevance import label_distribution, label_token_ids

    cot = task.output_format == "cot"
    if cot and (responses is None or len(responses) != len(records)):
        raise ValueError("responses must hold one decoded answer per record for cot")
    ids = label_token_ids(tokenizer)
    out = []
    for i, record in enumerate(records):
        context = task.prompt_ids(tokenizer, record)
        if cot:
            context = context + tokenizer.encode(reasoning_prefix(responses[i]),
                                                 add_special_tokens=False)
        logits = model(torch.tensor([context]))[0, -1]  # (V,) logits of the label token
        out.append(label_distribution(logits.float(), ids))
        if progress is not None:
            progress.update(1)
    return torch.stack(out) if out else torch.zeros(0, 4)


def measure_relevance_stage(path, label: str, tokenizer, task, dev, heldout, *,
                            max_tokens: int, examples: int = 2, progress: bool = False) -> dict:
    """A stage's row: ``accuracy`` / ``macro_f1`` of the decoded labels, ``format`` (the
    format judge's mean), ``tokens_per_response``, ``cumpt_tau``, ``cumpt_accuracy``,
    ``cumpt_macro_f1`` and ``argmax_accuracy`` (τ-free: the likeliest label token; cot
    decodes the dev split too, for its reasoning); ``ttft_ms``, ``tpot_ms``,
    ``label_first_ms`` and ``full_cot_ms``; a few example answers (the same records for every stage)."""
    from livethinking.model import CausalLM
    from livethinking.tasks.relevance import (accuracy, calibrate_tau, cumpt, macro_f1,
                                              parse_label)
    from livethinking.train.config import JudgeConfig

    model = CausalLM.from_pretrained(path).eval()
    post_cot = task.output_format == "post_cot"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * (len(dev) + len(heldout)),
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
        dev_responses = None
        if not post_cot:  # the label follows the reasoning: decode the dev split's too
            dev_responses = evaluate(model, tokenizer, dev, task.judges(JudgeConfig()),
                                     max_tokens=max_tokens, prompt=task.prompt_ids,
                                     probes=0).responses  # no latency probes
        if bar is not None:
            bar.update(len(dev))
        dev_p = label_probabilities(model, tokenizer, task, dev, responses=dev_responses,
                                    progress=bar)
        tau, dev_f1 = calibrate_tau(dev_p, torch.tensor([r.label for r in dev]))
        probs = label_probabilities(model, tokenizer, task, heldout, progress=bar,
                                    responses=None if post_cot else result.responses)
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
