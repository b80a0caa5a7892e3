"""``output_kind="final_only"``: reported once, text decoded once, the same result as a
cumulative request; the decode step's host-time counters."""

import pytest

from livethinking.engine import LLM, SamplingParams
from livethinking.model import CausalLM

@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from transformers import AutoTokenizer

    return (CausalLM.from_pretrained(tiny_checkpoint).eval(),
            AutoTokenizer.from_pretrained(tiny_checkpoint))


class CountingTokenizer:
    """The tokenizer, counting ``decode`` calls."""

    def __init__(self, inner):
        self.inner, self.decodes = inner, 0

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self.inner.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run(engine, request_id, prompt, params):
    engine.add_request(request_id, prompt, params)
    reports = []
    while engine.has_unfinished_requests():
        reports += [o for o in engine.step() if o.request_id == request_id]
    return reports


@pytest.mark.parametrize("stop", [[], ["the"]])
def test_final_only_is_reported_once_with_the_cumulative_result(tiny, stop):
    model, tokenizer = tiny
    prompt = tokenizer.encode("the red box")
    results = {}
    for kind in ("cumulative", "final_only"):
        llm = LLM(model, tokenizer, num_kv_blocks=64)
        params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, stop=stop,
                                output_kind=kind)
        results[kind] = _run(llm.engine, "r", prompt, params)
    cumulative, final = results["cumulative"], results["final_only"]
    assert len(final) == 1 and final[0].finished and len(cumulative) > 1
    for a, b in zip(cumulative[-1].outputs, final[0].outputs):
        assert (a.token_ids, a.text, a.logprobs, a.finish_reason, a.stop_reason) == (
            b.token_ids, b.text, b.logprobs, b.finish_reason, b.stop_reason)
        if not stop:
            assert b.text == tokenizer.decode(b.token_ids, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)


def test_final_only_decodes_once_and_generate_uses_it(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ("the red", "a green ball", "Sure!")]
    counts = {}
    for kind in ("cumulative", "final_only"):
        counting = CountingTokenizer(tokenizer)
        llm = LLM(model, counting, num_kv_blocks=64)
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                output_kind=kind)
        for i, prompt in enumerate(prompts):
            _run(llm.engine, f"r{i}", prompt, params)
        counts[kind] = counting.decodes
    assert counts["final_only"] == len(prompts)  # once per sample, when it finished
    assert counts["cumulative"] >= 2 * 16 * len(prompts)  # two decodes per token
    counting = CountingTokenizer(tokenizer)
    llm = LLM(model, counting, num_kv_blocks=64)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16,
                                                    ignore_eos=True))
    assert counting.decodes == len(prompts)  # generate: one decode per sample
    assert [o.outputs[0].text for o in outputs] == [
        tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True,
                         clean_up_tokenization_spaces=False) for o in outputs]


def test_decode_host_time_is_counted(tiny):
    model, tokenizer = tiny
    llm = LLM(model, tokenizer, num_kv_blocks=64)
    llm.generate([tokenizer.encode("the red box")] * 4,
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats.decode_steps >= 7 and stats.decode_tokens >= 4 * 7
    assert stats.decode_step_seconds >= stats.decode_model_seconds > 0.0
    assert 0.0 <= stats.decode_host_us_per_token < 1e6


def test_output_kind_is_checked():
    with pytest.raises(ValueError, match="output_kind must be one of cumulative, final_only"):
        SamplingParams(output_kind="delta")
    assert SamplingParams().output_kind == "cumulative"
