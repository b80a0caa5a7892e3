"""What the demo measures of each stage's student on the held-out prompts: the judged
greedy answers, TTFT and TPOT through the engine (``evaluate``), full-answer latency, and
the token-level log-likelihood of the reference answers.

    reference log-likelihood = Σ_records Σ_t log p(ref_t | prompt, <think></think>, ref_<t)
                               / Σ_records |ref|

over the reference answer's tokens followed by end-of-sequence, scored as the answer part
of the response format ``"<think>R</think> A"`` with an empty reasoning R (the
``<think></think>`` tokens are context, not scored: the reference has no reasoning, and
scoring its first word against the trained ``<think>`` would measure the format, not the
answer), with ``fused_linear_logprobs`` on the model's final hidden states (no N × V
logits kept).
    full-answer latency = TTFT + tokens per response × TPOT
"""

from __future__ import annotations

import statistics

import torch

from livethinking import ops
from livethinking.train.common import evaluate, prompt_ids, response_ids

__all__ = ["measure_stage", "mean_prompt_tokens", "reference_log_likelihood"]

EMPTY_REASONING = "<think></think>"


@torch.no_grad()
def reference_log_likelihood(model, tokenizer, records, *, system_prompt: str | None,
                             progress=None) -> float:
    """Mean log-prob per reference-answer token after an empty reasoning block (records
    without a reference are skipped); ``progress``: a tqdm bar to advance by one per
    record."""
    was_training = model.training
    model.eval()
    empty_reasoning = tokenizer.encode(EMPTY_REASONING, add_special_tokens=False)
    total_logp, total_tokens = 0.0, 0
    for record in records:
        if record.reference is not None:
            response = response_ids(tokenizer, f"{EMPTY_REASONING} {record.reference}")
            if response[:len(empty_reasoning)] != empty_reasoning:
                raise ValueError(f"the tokenizer does not split {EMPTY_REASONING!r} from the "
                                 "answer: <think> and </think> must be single tokens")
            prompt = prompt_ids(tokenizer, record, system_prompt) + empty_reasoning
            answer = response[len(empty_reasoning):]
            ids = torch.tensor(prompt + answer, dtype=torch.long)  # (T,)
            targets = ids[len(prompt):]  # (n,): the reference tokens and eos
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(prompt) - 1:-1] = True  # positions that predict the reference tokens

            def head(hidden, weight):  # hidden (1, T, H) -> (n,) log-probs
                return ops.fused_linear_logprobs(hidden[0][mask], weight, targets)

            logp = model.forward_hidden(ids[None], head=head, token_mask=mask[None]).head_output
            total_logp += float(logp.sum())
            total_tokens += len(targets)
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no held-out record has a reference answer to score")
    return total_logp / total_tokens


def mean_prompt_tokens(tokenizer, records, system_prompt: str | None) -> float:
    """Mean prompt length in tokens (the P of the cost formula)."""
    return statistics.fmean(len(prompt_ids(tokenizer, r, system_prompt)) for r in records)


def measure_stage(path, label: str, tokenizer, records, judges, *, max_tokens: int,
                  system_prompt: str | None, examples: int, progress: bool) -> dict:
    """One stage's row: correct, helpful, tokens_per_response, ttft_ms, tpot_ms,
    latency_ms, reference_log_likelihood, and ``examples`` answers spread evenly over the
    records (the same records for every stage)."""
    from livethinking.model import CausalLM

    model = CausalLM.from_pretrained(path)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * len(records), desc=f"evaluate ({label})", unit="answer",
                   dynamic_ncols=True)
    try:
        result = evaluate(model, tokenizer, records, judges, max_tokens=max_tokens,
                          system_prompt=system_prompt)
        if bar is not None:
            bar.update(len(records))  # answered, judged, TTFT/TPOT probed
        log_likelihood = reference_log_likelihood(model, tokenizer, records,
                                                  system_prompt=system_prompt, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    row = {"model": label, **result.as_dict()}
    row["latency_ms"] = row["ttft_ms"] + row["tokens_per_response"] * row["tpot_ms"]
    row["reference_log_likelihood"] = log_likelihood
    picks = sorted({i * len(records) // examples for i in range(examples)}) if examples else []
    row["examples"] = [{"id": records[i].id, "question": records[i].question,
                        "answer": result.responses[i]} for i in picks]
    return row
