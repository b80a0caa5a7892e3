"""The inference engine on tiny random fp32 models (CPU): parity with transformers'
generate, seeded sampling, prefix caching, n-sample forks, preemption, aborts, stops and
the trainer-consistency of reported log-probs."""

import pytest
import torch
import transformers

from livethinking import ops
from livethinking.engine import LLM, EngineConfig, EngineFullError, SamplingParams
from livethinking.model import CausalLM, ModelConfig

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=96,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
CASES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(BASE, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(BASE, tie_word_embeddings=True)),
}
# small blocks and token budget: prompts span several blocks and chunked prefill steps
SMALL = dict(block_size=4, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _hf_and_ours(case, seed=0):
    config_cls, model_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # larger than the default init: peaked, varied logits
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.15 * torch.randn_like(p))
    ours = CausalLM(ModelConfig.from_dict(hf.config.to_dict())).float().eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.fixture(scope="module")
def moe_pair():
    return _hf_and_ours("qwen3_moe")


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, BASE["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def _all_free(llm):
    stats = llm.engine.stats()
    return (stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0
            and stats.num_waiting == 0 and not llm.engine.has_unfinished_requests())


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_generate(case):
    hf, ours = _hf_and_ours(case)
    prompts = _prompts([1, 7, 16, 33, 5])
    llm = LLM(ours, **SMALL)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                          do_sample=False)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == ref
        assert output.outputs[0].finish_reason == "length"
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1  # not a degenerate model
    assert _all_free(llm)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_through_the_paged_decode_kernel_matches_transformers(case):
    hf, ours = _hf_and_ours(case)
    prompts = _prompts([3, 13])  # the kernel runs under the Triton interpreter here
    llm = LLM(ours, **SMALL, paged_decode_kernel=True)
    assert llm.engine.runner.cache.decode_kernel
    for prompt, output in zip(prompts, llm.generate(prompts, SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True))):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == ref


def test_logprobs_are_log_softmax_over_temperature_before_truncation(moe_pair):
    _, model = moe_pair
    prompt = _prompts([9])[0]
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, max_tokens=6, seed=3,
                            ignore_eos=True)
    out = LLM(model, **SMALL).generate([prompt], params)[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].double()  # (steps, V)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None])
    assert torch.allclose(torch.tensor(out.logprobs, dtype=torch.float64), expected[:, 0], atol=1e-5)
    # every drawn token lies in the top-5 of its step
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in row for t, row in zip(out.token_ids, top5.tolist()))


# ------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(moe_pair):
    _, model = moe_pair
    prompt, *others = _prompts([11, 4, 20, 13])
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone = LLM(model, **SMALL).generate([prompt], params)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    crowd = LLM(model, **SMALL, seed=99).generate(
        others + [prompt], [unseeded] * len(others) + [params])[-1].outputs[0].token_ids
    assert alone == crowd
    other_seed = LLM(model, **SMALL).generate(
        [prompt], SamplingParams(temperature=1.0, max_tokens=12, seed=4321, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_share_one_prefill_and_are_reproducible(moe_pair):
    _, model = moe_pair
    prompt = _prompts([14])[0]  # 14 tokens: 3 full blocks of 4 and a partial one to copy
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    llm = LLM(model, **SMALL)
    first = llm.generate([prompt], params)[0]
    assert llm.engine.stats().prefill_tokens == len(prompt)  # prefilled once for 4 samples
    assert [o.index for o in first.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 8 for o in first.outputs)
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    again = LLM(model, **SMALL).generate([prompt], params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    # each sample's log-probs are its own sequence's (forked KV is right)
    for o in first.outputs:
        ids = torch.tensor([prompt + o.token_ids])
        with torch.no_grad():
            logits = model(ids)[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), expected, atol=1e-5)
    assert _all_free(llm)


def test_sampler_frequencies_follow_the_truncated_distribution(generator):
    from livethinking.engine.sampler import SamplingBatch, sample

    vocab, rows = 7, 20000
    logits = torch.randn(1, vocab, generator=generator).expand(rows, vocab)
    batch = SamplingBatch(temperature=torch.full((rows,), 0.8), top_k=torch.full((rows,), 5),
                          top_p=torch.full((rows,), 0.9), keys=[None] * rows, counters=[0] * rows,
                          needs_truncation=True, all_greedy=False)
    tokens, _ = sample(logits, batch, torch.Generator().manual_seed(int(generator.initial_seed())))
    probs = torch.softmax(logits[0].double() / 0.8, -1)
    order = probs.argsort(descending=True)
    keep = order[:5]
    kept = probs[keep] / probs[keep].sum()
    mass_before = kept.cumsum(0) - kept
    keep, kept = keep[mass_before < 0.9], kept[mass_before < 0.9]
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[keep] = kept / kept.sum()
    counts = torch.bincount(tokens, minlength=vocab).double() / rows
    assert torch.all(counts[expected == 0] == 0)
    # 5 standard errors of a binomial frequency
    assert torch.all((counts - expected).abs() <= 5 * (expected * (1 - expected) / rows).sqrt() + 1e-12)


def test_seeded_rows_follow_the_distribution_and_their_counter(generator):
    """Seeded rows draw by the inverse CDF of a counter uniform: over many (key, counter)
    pairs the frequencies are the distribution's; the same pair gives the same token in any
    batch; the uniforms are uniform (a Kolmogorov-Smirnov bound)."""
    from livethinking.engine.sampler import SamplingBatch, counter_uniform, sample

    vocab, rows = 6, 20000
    logits = torch.randn(1, vocab, generator=generator).expand(rows, vocab)

    def batch(keys, counters):
        n = len(keys)
        return SamplingBatch(temperature=torch.full((n,), 1.0), top_k=torch.zeros(n, dtype=torch.long),
                             top_p=torch.ones(n), keys=keys, counters=counters,
                             needs_truncation=False, all_greedy=False)

    keys = [1234567 + 7919 * (i % 97) for i in range(rows)]
    counters = [i // 97 for i in range(rows)]
    tokens, _ = sample(logits, batch(keys, counters), None)
    probs = torch.softmax(logits[0].double(), -1)
    counts = torch.bincount(tokens, minlength=vocab).double() / rows
    assert torch.all((counts - probs).abs() <= 5 * (probs * (1 - probs) / rows).sqrt())
    alone, _ = sample(logits[:3], batch(keys[5:8], counters[5:8]), None)  # another batch
    assert torch.equal(alone, tokens[5:8])
    u = torch.tensor(sorted(counter_uniform(k, c) for k, c in zip(keys, counters)), dtype=torch.float64)
    assert u.min() >= 0 and u.max() < 1
    ks = (torch.arange(1, rows + 1, dtype=torch.float64) / rows - u).abs().max()
    assert ks <= 1.63 / rows**0.5  # the 1 % critical value


# ------------------------------------------------------------------ prefix cache
def test_prefix_cache_hit_skips_the_shared_blocks_and_gives_the_same_output(moe_pair):
    _, model = moe_pair
    document, question_a, question_b = _prompts([30, 6, 9])
    llm = LLM(model, **SMALL)
    llm.generate([document + question_a], GREEDY)
    before = llm.engine.stats()
    warm = llm.generate([document + question_b], GREEDY)[0]
    after = llm.engine.stats()
    shared_blocks = 30 // 4  # full blocks of the shared document
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == shared_blocks * 4
    assert warm.num_cached_tokens == shared_blocks * 4
    assert after.prefill_tokens - before.prefill_tokens == 30 + 9 - shared_blocks * 4
    cold = LLM(model, **SMALL, enable_prefix_caching=False).generate([document + question_b], GREEDY)[0]
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert torch.allclose(torch.tensor(warm.outputs[0].logprobs), torch.tensor(cold.outputs[0].logprobs),
                          atol=1e-5)
    assert _all_free(llm)


def test_weight_updates_are_seen_and_empty_the_prefix_cache():
    _, model = _hf_and_ours("qwen3_moe", seed=5)
    prompt = _prompts([18])[0]
    llm = LLM(model, **SMALL)
    before = llm.generate([prompt], GREEDY)[0].outputs[0]
    with torch.no_grad():  # what an optimizer step does: in place, no copy
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hits = llm.engine.stats().prefix_cache_hit_tokens
    after = llm.generate([prompt], GREEDY)[0].outputs[0]
    assert llm.engine.stats().prefix_cache_hit_tokens == hits  # stale KV was not reused
    fresh = LLM(model, **SMALL).generate([prompt], GREEDY)[0].outputs[0]
    assert after.token_ids == fresh.token_ids
    assert torch.allclose(torch.tensor(after.logprobs), torch.tensor(fresh.logprobs), atol=1e-5)
    assert not torch.allclose(torch.tensor(after.logprobs), torch.tensor(before.logprobs), atol=1e-3)
    assert llm.engine.model is model and llm.engine.model.lm_head.weight is model.lm_head.weight


# ------------------------------------------------------------------ trainer consistency
@pytest.mark.parametrize("deterministic", [True, False])
def test_reported_logprobs_equal_the_trainers_fused_linear_logprobs(moe_pair, deterministic):
    _, model = moe_pair
    prompts = _prompts([13, 5, 22])
    params = SamplingParams(n=2, temperature=0.9, max_tokens=12, seed=11, ignore_eos=True)
    llm = LLM(model, **SMALL, deterministic=deterministic)
    worst = 0.0
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        for o in output.outputs:
            ids = torch.tensor([prompt + o.token_ids])
            with torch.no_grad():  # the trainer's path: full forward to hidden, fused log-probs
                hidden = model.forward_hidden(ids).hidden_states[0, len(prompt) - 1:-1]
                trainer = ops.fused_linear_logprobs(hidden, model.lm_head.weight,
                                                    torch.tensor(o.token_ids), temperature=0.9)
            reported = torch.tensor(o.logprobs)
            worst = max(worst, (trainer - reported).abs().max().item())
            if deterministic:  # the same computation on the same weights: bitwise
                assert torch.equal(trainer, reported)
    assert worst <= (1e-6 if deterministic else 1e-5), worst


# ------------------------------------------------------------------ memory pressure
def test_preemption_under_a_small_pool_keeps_outputs_exact(moe_pair):
    _, model = moe_pair
    prompts = _prompts([10, 12, 9, 11])
    reference = LLM(model, **SMALL).generate(prompts, GREEDY)
    # 12 blocks of 4 tokens: all four cannot decode to 20+ tokens at once
    tight = LLM(model, block_size=4, max_num_batched_tokens=16, num_kv_blocks=12,
                max_model_len=40)
    outputs = tight.generate(prompts, GREEDY)
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert _all_free(tight)


def test_abort_frees_blocks_at_once(moe_pair):
    _, model = moe_pair
    llm = LLM(model, **SMALL)
    stream = llm.stream(_prompts([25])[0], SamplingParams(max_tokens=40, ignore_eos=True))
    next(stream)
    next(stream)
    assert llm.engine.stats().kv_blocks_used > 0
    stream.close()  # the consumer walks away: the request is aborted
    assert _all_free(llm)


def test_context_limit_clips_max_tokens(moe_pair):
    _, model = moe_pair
    llm = LLM(model, **SMALL, max_model_len=20)
    out = llm.generate([_prompts([15])[0]], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


# ------------------------------------------------------------------ text, stops, streaming
def test_streaming_text_only_grows_and_stop_strings_cut(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate(["does it come in blue?"], params)[0].outputs[0]
    assert full.text and full.finish_reason == "length"
    seen = ""
    for output in llm.stream("does it come in blue?", params):
        text = output.outputs[0].text
        assert text.startswith(seen)
        seen = text
    assert seen == full.text
    stop = full.text[len(full.text) // 2:][:3]
    cut = llm.generate(["does it come in blue?"],
                       SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == full.text[:full.text.index(stop)]
    first_token = full.token_ids[0]
    by_id = llm.generate(["does it come in blue?"], SamplingParams(
        temperature=0, max_tokens=30, stop_token_ids=[first_token]))[0].outputs[0]
    assert by_id.token_ids == [first_token] and by_id.finish_reason == "stop"
    assert by_id.stop_reason == first_token
    assert full.stop_reason is None
    assert _all_free(llm)


def test_eos_stops_generation(moe_pair):
    _, model = moe_pair
    prompt = _prompts([8])[0]
    free_run = LLM(model, **SMALL).generate([prompt], GREEDY)[0].outputs[0].token_ids
    model.config.eos_token_id = free_run[3]
    try:
        out = LLM(model, **SMALL).generate([prompt], SamplingParams(temperature=0, max_tokens=10))
    finally:
        model.config.eos_token_id = None
    expected = free_run[:free_run.index(free_run[3]) + 1]
    assert out[0].outputs[0].token_ids == expected and out[0].outputs[0].finish_reason == "stop"
    assert out[0].outputs[0].stop_reason is None  # an end-of-sequence token (vLLM's rule)


def test_retract_all_frees_everything_and_recomputes_the_same_output(moe_pair):
    _, model = moe_pair
    prompts = _prompts([9, 14, 6])
    params = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=12, ignore_eos=True)
    reference = LLM(model, **SMALL).generate(prompts, [params] * 3)
    llm = LLM(model, **SMALL)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    finished = {}
    for step in range(200):
        if step in (3, 9):  # mid-prefill and mid-decode
            assert engine.retract_all() > 0
            stats = engine.stats()
            assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    assert [[c.token_ids for c in finished[f"r{i}"].outputs] for i in range(3)] == [
        [c.token_ids for c in r.outputs] for r in reference]
    assert _all_free(llm)


def test_abort_request_returns_the_partial_output(moe_pair):
    _, model = moe_pair
    llm = LLM(model, **SMALL)
    llm.engine.add_request("a", _prompts([7])[0], SamplingParams(n=2, max_tokens=30,
                                                                 ignore_eos=True, seed=1))
    for _ in range(4):
        llm.engine.step()
    out = llm.engine.abort_request("a")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert all(0 < len(c.token_ids) < 30 for c in out.outputs)
    assert llm.engine.abort_request("a") is None and _all_free(llm)


# ------------------------------------------------------------------ bad input
def test_bad_requests_get_clear_errors(moe_pair):
    _, model = moe_pair
    llm = LLM(model, **SMALL, max_model_len=32, max_waiting=2)
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt has 32 tokens; the context is 32"):
        engine.add_request("long", [1] * 32, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        engine.add_request("range", [5, 101], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text", "hello", GREEDY)
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 2], GREEDY)
    engine.add_request("b", [1, 2], GREEDY)
    with pytest.raises(EngineFullError, match="max_waiting=2"):
        engine.add_request("c", [1, 2], GREEDY)
    engine.abort_request("a")
    engine.abort_request("b")
    engine.abort_request("never-added")
    assert _all_free(llm)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_sampling_params_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_engine_config_is_validated():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_cuda_graph_decode_matches_eager_and_transformers(case):
    hf, ours = _hf_and_ours(case)
    hf, ours = hf.cuda(), ours.cuda()
    prompts = _prompts([1, 7, 16, 33, 5])
    graphs = LLM(ours, **SMALL, cuda_graph_batch_sizes=(1, 2, 4, 8))
    assert graphs.engine.runner.graphs  # decode really replays captured graphs
    eager = LLM(ours, **SMALL, enforce_eager=True)
    with_graphs, without = graphs.generate(prompts, GREEDY), eager.generate(prompts, GREEDY)
    for prompt, a, b in zip(prompts, with_graphs, without):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                              atol=1e-4)
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=10,
                          min_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        assert a.outputs[0].token_ids == ref
    assert _all_free(graphs)


@pytest.mark.gpu
def test_gpu_seeded_sampling_and_prefix_cache():
    _, model = _hf_and_ours("qwen3_moe")
    model = model.cuda()
    document, question = _prompts([30, 6])
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    llm = LLM(model, **SMALL)
    first = llm.generate([document + question], params)[0]
    again = llm.generate([document + question], params)[0]  # now a prefix-cache hit
    assert again.num_cached_tokens == (36 - 1) // 4 * 4
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert _all_free(llm)


def test_chat_formats_with_the_template(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, block_size=4)
    messages = [{"role": "user", "content": "what does it cost?"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.decode(chat.prompt_token_ids) == text
    direct = llm.generate([chat.prompt_token_ids], SamplingParams(temperature=0, max_tokens=5,
                                                                   ignore_eos=True))[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_a_pool_smaller_than_one_context_is_refused(moe_pair):
    _, model = moe_pair
    with pytest.raises(ValueError, match="num_kv_blocks=3 cannot hold one sequence"):
        LLM(model, block_size=4, num_kv_blocks=3, max_model_len=40)


# ------------------------------------------------------------------ the LLM front, whole batches
def test_generate_takes_more_prompts_than_max_waiting_in_waves(moe_pair):
    _, model = moe_pair
    prompts = _prompts([3, 9, 1, 14, 6, 2, 11, 5, 7, 4, 10])
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=1.0, max_tokens=5, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    llm = LLM(model, **SMALL, max_waiting=4)
    outputs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outputs] == prompts
    solo = [LLM(model, **SMALL).generate([p], q)[0] for p, q in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in solo]
    assert _all_free(llm)
    again = llm.generate(prompts[:2], params[:2])  # still usable
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in solo[:2]]


def test_a_bad_prompt_in_a_batch_adds_nothing_and_the_next_call_works(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["a", ""], params)
    assert not llm.engine.has_unfinished_requests() and _all_free(llm)
    out = llm.generate(["c"], params)
    assert out[0].outputs[0].token_ids == LLM(tiny_checkpoint, block_size=4).generate(
        ["c"], params)[0].outputs[0].token_ids
    with pytest.raises(TypeError, match="params must be SamplingParams"):
        llm.generate(["a", "b"], [params, None])
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.stream("", params)  # refused at the call, before anything is queued
    assert _all_free(llm)


def test_prompt_ids_must_be_plain_ints_in_a_list(tiny_checkpoint):
    engine = LLM(tiny_checkpoint, block_size=4).engine
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="token ids must be ints"):
        engine.validate_request([1, True], params)  # a bool is an int to Python, not an id
    with pytest.raises(TypeError, match="prompt must be a str or a list of token ids"):
        engine.validate_request(iter([1, 2]), params)
    too_long = [1] * engine.max_model_len
    with pytest.raises(ValueError, match=f"prompt has {engine.max_model_len} tokens"):
        engine.validate_request(too_long, params)
    assert engine.validate_request((3, 4), params) == [3, 4]


def _interrupt_on_call(llm, monkeypatch, call: int):
    execute, calls = llm.engine.runner.execute, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return execute(*args, **kwargs)
    monkeypatch.setattr(llm.engine.runner, "execute", interrupted)


def test_an_interrupt_mid_step_leaves_the_engine_empty(moe_pair, monkeypatch):
    _, model = moe_pair
    prompts = _prompts([9, 13, 4])
    llm = LLM(model, **SMALL)
    reference = llm.generate(prompts, GREEDY)
    _interrupt_on_call(llm, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY)
    assert _all_free(llm)
    _interrupt_on_call(llm, monkeypatch, 4)
    stream = llm.stream(prompts[0], GREEDY)
    with pytest.raises(KeyboardInterrupt):
        list(stream)
    assert _all_free(llm)
    monkeypatch.undo()
    again = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in reference]
    assert _all_free(llm)
