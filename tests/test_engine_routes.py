"""The engine reports the experts its MoE layers chose (``return_routed_experts``): one row
per token but the last, kept beside the KV slots so prefix-cache hits and forked samples
carry their prompt's routes; replaying them in the trainer's forward reproduces the
engine's deterministic log-probs bit for bit."""

import pytest
import torch

from livethinking import ops
from livethinking.engine import LLM, EngineConfig, SamplingParams
from livethinking.model import CausalLM

PROMPT = [5, 17, 29, 41, 3, 77, 12, 9, 64, 2, 31, 18, 40, 7, 25, 51, 36, 11]  # > 1 block


def _llm(checkpoint, **kw):
    return LLM(checkpoint, device="cpu", config=EngineConfig(
        enable_return_routed_experts=True, block_size=8, **kw))


def _trainer_logprobs(model, ids, num_prompt, routes=None):
    """The trainer's log-probs of ids[num_prompt:] from a full forward, replaying
    ``routes`` (len − 1 rows) if given. The last token's experts, which the engine does not
    report, come from a free forward: they change no log-prob, but they do change the
    expert GEMMs' row counts, and so on the CPU those GEMMs' last bits."""
    t = torch.tensor([ids])
    replay = None
    if routes is not None:
        last = model.forward_hidden(t, return_routes=True).routed_experts[0, -1:]
        replay = torch.cat([routes.int(), last.int()])[None]
    out = model.forward_hidden(t, routed_experts=replay)
    hidden = out.hidden_states[0, num_prompt - 1:-1]
    return ops.fused_linear_logprobs(hidden, model.lm_head.weight, t[0, num_prompt:]).tolist()


def test_deterministic_routes_replay_to_the_engines_logprobs_exactly(tiny_checkpoint):
    llm = _llm(tiny_checkpoint, deterministic=True)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True,
                            return_routed_experts=True)
    outputs = llm.generate([PROMPT], [params])[0].outputs
    model = CausalLM.from_pretrained(tiny_checkpoint)
    config = model.config
    for sample in outputs:
        ids = PROMPT + list(sample.token_ids)
        routes = sample.routed_experts
        assert routes.dtype == torch.int16
        assert routes.shape == (len(ids) - 1, 2, config.num_experts_per_tok)
        assert int(routes.min()) >= 0 and int(routes.max()) < config.num_experts
        replayed = _trainer_logprobs(model, ids, len(PROMPT), routes)
        assert replayed == sample.logprobs  # bit for bit
    # and the routes are the trainer's own: a free forward chooses the same experts
    free = model.forward_hidden(torch.tensor([ids]), return_routes=True).routed_experts
    assert torch.equal(free[0, :-1].to(torch.int16), outputs[-1].routed_experts)


def test_batched_routes_are_the_experts_of_each_slot(tiny_checkpoint):
    """Without deterministic mode the routes are read from the slots the decode steps
    wrote; they match a full forward of the finished sequence up to float ties, prompts
    served from the prefix cache keep their routes, and forked samples share theirs."""
    llm = _llm(tiny_checkpoint)
    model = CausalLM.from_pretrained(tiny_checkpoint)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5, ignore_eos=True,
                            return_routed_experts=True)
    first = llm.generate([PROMPT], [params])[0]
    again = llm.generate([PROMPT], [params])[0]  # the prompt's full blocks are cached now
    assert again.num_cached_tokens >= 8
    prompt_rows = len(PROMPT) - 1
    agree, total = 0, 0
    for a, b in zip(first.outputs, again.outputs):
        assert torch.equal(a.routed_experts[:prompt_rows], first.outputs[0].routed_experts[
            :prompt_rows])  # forks share the prompt's routes
        assert torch.equal(a.routed_experts[:prompt_rows], b.routed_experts[:prompt_rows])
        ids = PROMPT + list(a.token_ids)
        free = model.forward_hidden(torch.tensor([ids]), return_routes=True).routed_experts
        same = (free[0, :-1].sort(-1).values == a.routed_experts.int().sort(-1).values).all(-1)
        agree, total = agree + int(same.sum()), total + same.numel()
    assert agree / total >= 0.98, agree / total


def test_routes_need_the_engine_flag(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="enable_return_routed_experts"):
        llm.generate([PROMPT], [SamplingParams(return_routed_experts=True)])
    out = llm.generate([PROMPT], [SamplingParams(max_tokens=3)])[0].outputs[0]
    assert out.routed_experts is None


def _decode(b64, layers, k):
    import base64

    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype="<i4").copy()
                            ).reshape(-1, layers, k)


def test_routes_survive_the_servers_base64(tiny_checkpoint):
    import httpx2

    from livethinking.server import AsyncEngine, build_app
    from serving import Served

    reference = _llm(tiny_checkpoint, deterministic=True)
    want = reference.generate([PROMPT], [SamplingParams(
        n=2, temperature=1.0, max_tokens=6, seed=4, ignore_eos=True,
        return_routed_experts=True)])[0].outputs
    served = Served(build_app(AsyncEngine(_llm(tiny_checkpoint, deterministic=True).engine),
                              "tiny"))
    try:
        answer = httpx2.post(f"{served.url}/generate", json={
            "input_ids": PROMPT, "return_routed_experts": True, "sampling_params": {
                "n": 2, "temperature": 1.0, "max_new_tokens": 6, "sampling_seed": 4,
                "ignore_eos": True}}, timeout=60).json()
        for item, sample in zip(answer, want):
            assert item["output_ids"] == list(sample.token_ids)
            routes = _decode(item["meta_info"]["routed_experts"], 2, 2)
            assert routes.shape == (len(PROMPT) + 6 - 1, 2, 2)
            assert torch.equal(routes, sample.routed_experts.int())
        completion = httpx2.post(f"{served.url}/v1/completions", json={
            "model": "tiny", "prompt": PROMPT, "n": 2, "temperature": 1.0, "max_tokens": 6,
            "seed": 4, "ignore_eos": True, "return_routed_experts": True}, timeout=60).json()
        for choice, sample in zip(completion["choices"], want):
            assert torch.equal(_decode(choice["routed_experts"], 2, 2),
                               sample.routed_experts.int())
        plain = httpx2.post(f"{served.url}/v1/completions", json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=60).json()
        assert "routed_experts" not in plain["choices"][0]
        streamed = httpx2.post(f"{served.url}/v1/completions", json={
            "model": "tiny", "prompt": PROMPT, "stream": True, "return_routed_experts": True},
            timeout=60)
        assert streamed.status_code == 400 and "stream" in streamed.json()["error"]["message"]
    finally:
        served.close()
    bare = Served(build_app(AsyncEngine(LLM(tiny_checkpoint, device="cpu").engine), "tiny"))
    try:
        refused = httpx2.post(f"{bare.url}/generate", json={
            "input_ids": PROMPT, "return_routed_experts": True}, timeout=60)
        assert refused.status_code == 400
        assert "enable-return-routed-experts" in refused.json()["error"]["message"]
    finally:
        bare.close()
