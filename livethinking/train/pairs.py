"""Preference pairs for DPO: read from JSON lines, or built by pass@N sampling.

pass@N (TaoSR1's second stage): N samples per prompt from the SFT model; each sample is
judged by the task's correctness judge (correct: score 1); chosen = a correct sample,
rejected = a wrong one. A prompt whose N samples are all correct or all wrong gives no pair
and is counted (``skipped_all_correct`` / ``skipped_all_wrong``); its accuracy (correct / N)
is kept either way, the offline difficulty estimate GRPO's difficulty filter reads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PreferencePair", "build_pairs", "load_pairs", "sample_n"]


@dataclass(frozen=True, slots=True)
class PreferencePair:
    record: object  # the prompt's record (any task)
    chosen: str
    rejected: str


def _distinct(texts: list[str]) -> list[str]:
    seen, out = set(), []
    for text in texts:
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def build_pairs(records, samples: dict[str, list[str]], correctness, *,
                pairs_per_prompt: int = 1):
    """(pairs, stats, accuracy by record id) from ``samples`` (id -> responses).

    Per prompt: correct and wrong samples, duplicates dropped (order kept); pair i takes
    correct[i mod c] and wrong[i mod w], for i < min(pairs_per_prompt, max(c, w)) — so
    distinct texts are used before any repeats."""
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    flat = [(r, text) for r in records for text in samples.get(r.id, [])]
    verdicts = correctness.judge_many([r for r, _ in flat], [t for _, t in flat])
    right: dict[str, list[str]] = {r.id: [] for r in records}
    wrong: dict[str, list[str]] = {r.id: [] for r in records}
    for (record, text), verdict in zip(flat, verdicts):
        (right if verdict.score >= 1.0 else wrong)[record.id].append(text)
    pairs, accuracy = [], {}
    stats = {"prompts": len(records), "samples": len(flat), "pairs": 0,
             "skipped_all_correct": 0, "skipped_all_wrong": 0, "skipped_no_samples": 0}
    for record in records:
        n = len(right[record.id]) + len(wrong[record.id])
        if n == 0:
            stats["skipped_no_samples"] += 1
            continue
        accuracy[record.id] = len(right[record.id]) / n
        good, bad = _distinct(right[record.id]), _distinct(wrong[record.id])
        if not bad:
            stats["skipped_all_correct"] += 1
            continue
        if not good:
            stats["skipped_all_wrong"] += 1
            continue
        for i in range(min(pairs_per_prompt, max(len(good), len(bad)))):
            pairs.append(PreferencePair(record, good[i % len(good)], bad[i % len(bad)]))
    stats["pairs"] = len(pairs)
    return pairs, stats, accuracy


def load_pairs(path, records) -> list[PreferencePair]:
    """Pairs from JSON lines ``{"id", "chosen", "rejected"}``; ``id`` names a record of
    ``records``. Errors name the file, the line and the field."""
    from livethinking.data import load_json_lines

    by_id = {r.id: r for r in records}

    def parse(row: object) -> PreferencePair:
        if not isinstance(row, dict):
            raise ValueError("expected an object with id, chosen and rejected")
        for key in ("id", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{key} must be a string")
        if row["id"] not in by_id:
            raise ValueError(f"id {row['id']!r} is not a record of train_data")
        return PreferencePair(by_id[row["id"]], row["chosen"], row["rejected"])

    pairs = load_json_lines(path, parse).items
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def sample_n(llm, prompts: list[list[int]], records, *, n: int, temperature: float,
             top_p: float, max_tokens: int, seed: int) -> dict[str, list[str]]:
    """record id -> ``n`` sampled responses (the engine prefills each prompt once and forks
    it); seeds are ``seed + i`` for the i-th record, so the samples repeat run to run."""
    from livethinking.engine import SamplingParams

    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             seed=seed + i, logprobs=False) for i in range(len(records))]
    outputs = llm.generate(prompts, params)
    return {r.id: [c.text for c in out.outputs] for r, out in zip(records, outputs)}
