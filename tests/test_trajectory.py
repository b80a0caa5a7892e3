"""Multi-turn trajectories through the engine: token layout, masks, prefix-cache reuse,
log-probs and routes per turn, limits; the SFT tokenization of a conversation."""

import pytest
import torch

from livethinking.engine import LLM
from livethinking.envs import Environment, StepResult
from livethinking.model import CausalLM
from livethinking.model.prompt import encode_chat
from livethinking.rollout import (TrajectoryConfig, TurnRenderer, run_trajectories,
                                  tokenize_conversation)
from livethinking.train.agent import trajectory_batch, trajectory_stats
from livethinking.train.grpo_step import completion_logprobs

CORPUS = ["<tool_call>{\"name\": \"look\", \"arguments\": {\"at\": \"box\"}}</tool_call>",
          "observation 1: a red box and a blue ball", "You are an agent. Look around.",
          "I want color: red, material: glass."] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    tokenizer = build_tokenizer(corpus, root / "tok")
    path = build_student(tokenizer, DemoSize(hidden=32, layers=2, experts=4), root / "m", 0)
    torch.manual_seed(0)
    model = CausalLM.from_pretrained(path).eval()
    return model, tokenizer


class Scripted(Environment):
    """Replies ``observation t`` to turn t; done after ``turns`` turns (reward = turns)."""

    def __init__(self, turns: int):
        self.turns = turns

    def reset(self, task):
        self.t = 0
        self.actions = []
        return [{"role": "system", "content": "You are an agent."},
                {"role": "user", "content": f"Look around, task {task}."}]

    def step(self, action_text):
        self.t += 1
        self.actions.append(action_text)
        return StepResult([{"role": "tool", "content": f"observation {self.t}: a red box"}],
                          float(self.t), self.t >= self.turns, {"t": self.t})


def _llm(model, tokenizer, **kw):
    return LLM(model, tokenizer, num_kv_blocks=512, block_size=16, **kw)


def test_turns_extend_each_other_and_the_prefix_cache_serves_the_history(tiny):
    model, tokenizer = tiny
    llm = _llm(model, tokenizer)
    renderer = TurnRenderer(tokenizer)
    envs = [Scripted(3), Scripted(2), Scripted(4)]
    config = TrajectoryConfig(max_turns=6, max_turn_tokens=12, max_total_tokens=400)
    before = llm.engine.stats()
    trajectories = run_trajectories(llm, renderer, envs, ["a", "b", "c"], config, [1, 2, 3])
    after = llm.engine.stats()
    assert [len(t.turns) for t in trajectories] == [3, 2, 4]  # input order kept
    assert [t.task for t in trajectories] == ["a", "b", "c"]
    assert all(t.end == "done" for t in trajectories)
    assert [t.reward for t in trajectories] == [3.0, 2.0, 4.0]
    expected_hits = 0
    for t in trajectories:
        assert len(t.token_ids) == len(t.model_mask) == len(t.chunk_ids) == len(t.logprobs)
        mask = [0] * len(t.token_ids)
        for k, turn in enumerate(t.turns):
            for j in range(turn.start, turn.end):
                mask[j] = 1
                assert t.chunk_ids[j] == k and t.logprobs[j] < 0.0
            # this turn's prompt is everything before its sampled tokens
            assert turn.prompt_tokens == len(t.prompt_ids) + turn.start
            if k:
                prev = t.turns[k - 1]
                computed = prev.prompt_tokens + (prev.end - prev.start) - 1  # KV written
                assert turn.cached_tokens == 16 * (computed // 16)
                assert turn.cached_tokens > 0
                expected_hits += turn.cached_tokens
        assert t.model_mask == mask  # the model's sampled tokens, nothing else
        assert all(c == -1 for c, m in zip(t.chunk_ids, t.model_mask) if not m)
        # the environment's tokens are the template's rendering of its messages
        for k in range(len(t.turns) - 1):
            gap = t.token_ids[t.turns[k].end:t.turns[k + 1].start]
            text = tokenizer.decode(gap)
            assert f"observation {k + 1}: a red box" in text and "<|im_start|>tool" in text
            assert text.endswith("<|im_start|>assistant\n")
        assert t.messages[2]["role"] == "assistant" and t.messages[3]["role"] == "tool"
    hits = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
    assert hits >= expected_hits  # (the openings may share cached blocks too)
    stats = trajectory_stats(trajectories)
    assert 0.0 < stats["prefix_hit"] <= 1.0 and stats["turns"] == pytest.approx(3.0)


def test_seeded_trajectories_repeat_and_sampler_logprobs_match_a_full_forward(tiny):
    model, tokenizer = tiny
    renderer = TurnRenderer(tokenizer)
    config = TrajectoryConfig(max_turns=3, max_turn_tokens=10, max_total_tokens=300)
    first = run_trajectories(_llm(model, tokenizer), renderer, [Scripted(3), Scripted(3)],
                             ["x", "y"], config, [5, 6])
    again = run_trajectories(_llm(model, tokenizer), renderer, [Scripted(3), Scripted(3)],
                             ["x", "y"], config, [5, 6])
    assert [t.token_ids for t in first] == [t.token_ids for t in again]
    batch = trajectory_batch(first, torch.device("cpu"))
    assert batch.chunk_ids.shape == batch.mask.shape
    full = completion_logprobs(model, batch, temperature=1.0)  # teacher-forced, one forward
    for b, t in enumerate(first):
        n = len(t.token_ids)
        assert torch.equal(batch.mask[b, :n], torch.tensor(t.model_mask, dtype=torch.float32))
        sampled = torch.tensor(t.logprobs)
        # fp32 incremental decode with cached KV vs one fp32 forward: ~1e-6 apart
        assert torch.allclose(full[b, :n] * batch.mask[b, :n], sampled, atol=2e-4, rtol=0)
        assert (full[b, n:] == 0).all()


def test_routed_experts_of_every_turn_agree_with_the_history(tiny):
    model, tokenizer = tiny
    llm = _llm(model, tokenizer, enable_return_routed_experts=True)
    config = TrajectoryConfig(max_turns=3, max_turn_tokens=8, max_total_tokens=300,
                              return_routed_experts=True)
    (t,) = run_trajectories(llm, TurnRenderer(tokenizer), [Scripted(3)], ["r"], config, [9])
    routes = [torch.as_tensor(turn.routed_experts) for turn in t.turns]
    for turn, r in zip(t.turns, routes):
        assert r.shape[0] == turn.prompt_tokens + (turn.end - turn.start) - 1
    for earlier, later in zip(routes, routes[1:]):  # served from the cache, same experts
        assert torch.equal(later[:earlier.shape[0]], earlier)
    batch = trajectory_batch([t], torch.device("cpu"), routes=True)
    out = model.forward_hidden(batch.input_ids, return_routes=True)
    own = out.routed_experts[0, :len(t) - 1].sort(-1).values
    replay = batch.routed_experts[0, :len(t) - 1].sort(-1).values
    assert (own == replay).all(-1).float().mean() > 0.99  # fp32 ties aside: the same experts


def test_limits_end_trajectories_and_a_cut_turn_gets_an_unmasked_end_token(tiny):
    model, tokenizer = tiny
    renderer = TurnRenderer(tokenizer)
    llm = _llm(model, tokenizer)
    (capped,) = run_trajectories(llm, renderer, [Scripted(99)], ["m"],
                                 TrajectoryConfig(max_turns=2, max_turn_tokens=4,
                                                  max_total_tokens=500), [1])
    assert capped.end == "max_turns" and len(capped.turns) == 2
    first = capped.turns[0]
    if first.finish_reason == "length":  # 4 tokens: cut before the end-of-turn token
        assert capped.token_ids[first.end] == tokenizer.eos_token_id
        assert capped.model_mask[first.end] == 0
    opening = len(renderer.opening(Scripted(1).reset("t")))
    (short,) = run_trajectories(llm, renderer, [Scripted(99)], ["t"],
                                TrajectoryConfig(max_turns=50, max_turn_tokens=8,
                                                 max_total_tokens=opening + 40), [2])
    assert short.end == "max_tokens" and len(short) <= opening + 40
    with pytest.raises(ValueError, match="opening prompt"):
        run_trajectories(llm, renderer, [Scripted(1)], ["t"],
                         TrajectoryConfig(max_total_tokens=5), [0])
    with pytest.raises(ValueError, match="one entry per trajectory"):
        run_trajectories(llm, renderer, [Scripted(1)], ["t", "u"], TrajectoryConfig(), [0])
    assert llm.engine.stats().num_running == 0 and llm.engine.stats().num_waiting == 0


def test_tokenize_conversation_is_the_templates_rendering_with_exact_masks(tiny):
    _, tokenizer = tiny
    renderer = TurnRenderer(tokenizer)
    messages = [{"role": "system", "content": "You are an agent."},
                {"role": "user", "content": "Look around."},
                {"role": "assistant", "content": CORPUS[0]},
                {"role": "tool", "content": "observation 1: a red box"},
                {"role": "assistant", "content": "I want color: red."},
                {"role": "tool", "content": "observation 2"},
                {"role": "user", "content": "and now?"},
                {"role": "assistant", "content": "done"}]
    prompt, tokens, mask, chunks = tokenize_conversation(renderer, messages)
    whole = encode_chat(tokenizer, messages, add_generation_prompt=False)
    assert prompt + tokens == whole[:len(prompt) + len(tokens)]
    assert tokenizer.decode(whole[len(prompt) + len(tokens):]) == "\n"  # the template's tail
    for k, content in enumerate(["<tool_call>", "I want color: red.", "done"]):
        ids = [tok for tok, c in zip(tokens, chunks) if c == k]
        assert tokenizer.decode(ids).startswith(content) and ids[-1] == tokenizer.eos_token_id
    assert [m for m, c in zip(mask, chunks) if c >= 0] == [1] * sum(mask)
    assert all(m == 0 for m, c in zip(mask, chunks) if c < 0)
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_conversation(renderer, messages[:2])


QWEN3_LIKE = (  # Qwen3's rules that matter here: a think block on the last assistant turn
    # only, tool results as <tool_response> inside a user turn
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- if loop.last %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content }}"
    "{%- else %}{{ '<|im_start|>assistant\\n' + m.content }}{%- endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}"
    "{%- endif %}{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def test_turns_join_under_a_template_that_renders_the_last_assistant_turn_apart(tiny):
    import copy

    _, tokenizer = tiny
    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = QWEN3_LIKE
    renderer = TurnRenderer(qwen)
    between = renderer.between([{"role": "tool", "content": "obs one"},
                                {"role": "tool", "content": "obs two"}])
    assert qwen.decode(between) == ("\n<|im_start|>user\n<tool_response>\nobs one\n"
                                    "</tool_response>\n<tool_response>\nobs two\n"
                                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="eos"):
        TurnRenderer(bare)
