"""GRPO rollouts: G completions per prompt from the in-process engine (sharing the
policy's weights) or from external OpenAI-compatible servers (round robin)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from livethinking.data import LivestreamRecord
from livethinking.train.config import RolloutConfig

__all__ = ["Rollout", "engine_rollouts", "openai_rollouts", "server_rollouts"]


@dataclass(slots=True)
class Rollout:
    record: LivestreamRecord
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the end-of-sequence token when the model stopped
    text: str
    logprobs: list[float] | None  # the sampler's, under softmax(logits / temperature)
    weight_version: str | None = None  # of the policy that sampled it (servers only)
    # the sampler's experts per token but the last, (prompt + completion − 1, layers, k)
    # or flat (the servers' wire form); only when routing replay asks for them
    routed_experts: object = None


def engine_rollouts(llm, records: list[LivestreamRecord], prompts: list[list[int]],
                    config: RolloutConfig, seeds: list[int], *,
                    routes: bool = False) -> list[list[Rollout]]:
    """One group of ``group_size`` rollouts per prompt; the prompt is prefilled once.
    ``routes``: each rollout keeps the experts the engine chose (routing replay R3)."""
    from livethinking.engine import SamplingParams

    params = [SamplingParams(n=config.group_size, temperature=config.temperature,
                             top_p=config.top_p, top_k=config.top_k, max_tokens=config.max_tokens,
                             seed=seed, return_routed_experts=routes) for seed in seeds]
    outputs = llm.generate(prompts, params)
    return [[Rollout(record, prompt, list(c.token_ids), c.text, c.logprobs,
                     routed_experts=c.routed_experts) for c in out.outputs]
            for record, prompt, out in zip(records, prompts, outputs)]


def openai_rollouts(tokenizer, records: list[LivestreamRecord], prompts: list[list[int]],
                    config: RolloutConfig, seeds: list[int]) -> list[list[Rollout]]:
    """Rollouts from external servers via /v1/completions with the prompt as token ids.
    The text is re-tokenized (+ end-of-sequence when the server stopped on it); the
    server's per-token log-probs are kept only when they line up with those tokens."""
    import openai

    clients = [openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=3)
               for url in config.base_urls]

    def ask(item):
        i, (record, prompt, seed) = item
        reply = clients[i % len(clients)].completions.create(
            model=config.served_model, prompt=prompt, n=config.group_size,
            temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
            seed=seed, logprobs=1)
        group = []
        for choice in sorted(reply.choices, key=lambda c: c.index):
            ids = tokenizer.encode(choice.text, add_special_tokens=False)
            if choice.finish_reason == "stop":
                ids.append(tokenizer.eos_token_id)
            served = getattr(choice.logprobs, "token_logprobs", None) if choice.logprobs else None
            logprobs = list(served) if served and len(served) == len(ids) else None
            group.append(Rollout(record, prompt, ids, choice.text, logprobs))
        return group

    with ThreadPoolExecutor(max_workers=max(1, 4 * len(clients))) as pool:
        return list(pool.map(ask, enumerate(zip(records, prompts, seeds))))


def server_rollouts(pool, records: list[LivestreamRecord], prompts: list[list[int]],
                    config: RolloutConfig, seeds: list[int], *,
                    eos_token_ids: set[int], routes: bool = False) -> list[list[Rollout]]:
    """One group per prompt from the rollout servers (``ServerPool``): the servers' own
    token ids and sampler log-probs, and the weight version that sampled them."""
    params = [{"n": config.group_size, "temperature": config.temperature,
               "top_p": config.top_p, "top_k": config.top_k or -1,
               "max_new_tokens": config.max_tokens, "sampling_seed": seed} for seed in seeds]
    pool.refresh_health()
    answers = pool.generate_many(prompts, params, eos_token_ids=eos_token_ids,
                                 return_routed_experts=routes)
    return [[Rollout(record, prompt, s.token_ids, s.text, s.logprobs, s.weight_version,
                     s.routed_experts)
             for s in samples] for record, prompt, samples in zip(records, prompts, answers)]
