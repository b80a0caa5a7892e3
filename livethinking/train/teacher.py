"""RFT's rejection sampling: k teacher samples per prompt, kept when judged correct AND
helpful. Teachers: a JSONL of samples, the programmatic demo teacher, a local checkpoint
through our engine, or an OpenAI-compatible endpoint."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from livethinking.data import load_teacher_samples
from livethinking.rewards import is_accepted
from livethinking.train.config import TeacherConfig

__all__ = ["accept_samples", "teacher_responses"]


def teacher_responses(config: TeacherConfig, records: list, *, seed: int,
                      system_prompt: str | None = None, progress: bool = False,
                      task=None) -> dict[str, list[str]]:
    """record id -> the teacher's responses (up to k); ``progress``: a bar over the prompts
    (with ETA) for the demo and OpenAI-endpoint teachers. ``task`` (``train.tasks.Task``,
    default livestream with ``system_prompt``): how records become prompts, and which
    programmatic teacher ``kind: demo`` is."""
    from livethinking.train.tasks import Task

    task = task or Task(system_prompt=system_prompt)
    if config.kind == "jsonl":
        by_id: dict[str, list[str]] = defaultdict(list)
        for sample in load_teacher_samples(config.path).items:
            by_id[sample.id].append(sample.response)
        return {r.id: by_id.get(r.id, [])[:config.k] for r in records}
    if config.kind == "demo" and task.name == "relevance":
        from livethinking.tasks.relevance import relevance_teacher

        return relevance_teacher(list(_bar(records, progress)), k=config.k, seed=seed,
                                 output_format=task.output_format, error_rate=config.error_rate)
    if config.kind == "demo":
        from livethinking.tasks.livestream import DemoTeacher

        teacher = DemoTeacher(seed=seed, error_rate=config.error_rate,
                              min_filler=config.min_filler, max_filler=config.max_filler)
        return {r.id: teacher.respond(r, config.k) for r in _bar(records, progress)}
    if config.kind == "engine":
        return _engine_responses(config, records, seed, task)
    return _openai_responses(config, records, seed, task, progress)


def _bar(items, enabled: bool, total: int | None = None):
    """``items``, behind a tqdm bar labelled "teacher" when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="teacher", unit="prompt", dynamic_ncols=True)


def _engine_responses(config, records, seed, task):
    from livethinking.engine import LLM, SamplingParams

    llm = LLM(config.path)
    params = [SamplingParams(n=config.k, temperature=config.temperature,
                             max_tokens=config.max_tokens, seed=seed + i, logprobs=False)
              for i in range(len(records))]
    outputs = llm.generate([task.prompt_ids(llm.tokenizer, r) for r in records], params)
    return {r.id: [c.text for c in o.outputs] for r, o in zip(records, outputs)}


def _openai_responses(config, records, seed, task, progress=False):
    import openai

    client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key, max_retries=3)

    def ask(item):
        i, record = item
        reply = client.chat.completions.create(
            model=config.model, n=config.k, temperature=config.temperature, seed=seed + i,
            max_tokens=config.max_tokens, messages=task.messages(record))
        return record.id, [c.message.content or "" for c in reply.choices]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(_bar(pool.map(ask, enumerate(records)), progress, total=len(records)))


def accept_samples(records, responses: dict[str, list[str]], judges, *,
                   helpful_threshold: float) -> tuple[list[tuple[object, str]], dict]:
    """Keep (record, response) pairs judged correct (score 1) AND helpful (≥ threshold)."""
    pairs = [(r, text) for r in records for text in responses.get(r.id, [])]
    correctness, helpfulness = judges
    c = correctness.judge_many([p[0] for p in pairs], [p[1] for p in pairs])
    h = helpfulness.judge_many([p[0] for p in pairs], [p[1] for p in pairs])
    kept = [p for p, cv, hv in zip(pairs, c, h)
            if is_accepted(cv, hv, helpfulness_threshold=helpful_threshold)]
    stats = {"samples": len(pairs), "accepted": len(kept),
             "correct": sum(v.score >= 1.0 for v in c), "prompts_with_a_sample":
             len({r.id for r, _ in kept})}
    return kept, stats
