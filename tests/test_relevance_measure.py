"""Reading a relevance stage's label: where CumPT reads the label token's distribution in
each format (post_cot: the first response position; cot: after the decoded reasoning)."""

import pytest
import torch

from livethinking.model import CausalLM, ModelConfig
from livethinking.tasks.relevance import (RelevanceRecord, format_response,
                                          label_distribution, label_token_ids)
from livethinking.train.relevance_measure import label_probabilities, reasoning_prefix
from livethinking.train.tasks import Task


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from livethinking.train.demo import build_tokenizer

    corpus = tmp_path_factory.mktemp("tok") / "corpus.txt"
    lines = [format_response(k, f"reason {k} about the query", f)
             for k in (1, 2, 3, 4) for f in ("cot", "post_cot")]
    corpus.write_text("\n".join(lines * 20 + ["kettle blender color price 29 dollars"]) + "\n")
    return build_tokenizer(corpus, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(model_type="qwen3_moe", vocab_size=len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                         eos_token_id=tokenizer.eos_token_id)
    return CausalLM(config).float().eval()


RECORDS = [RelevanceRecord(id=f"r{i}", query=q, product_doc=f"category: kettle\nprice: {p}",
                           label=1 + i % 4)
           for i, (q, p) in enumerate([("kettle", "29 dollars"), ("blender 29 dollars", "9"),
                                       ("red kettle", "29 dollars")])]


def test_reasoning_prefix():
    assert reasoning_prefix("<think>a</think>\n3-Related") == "<think>a</think>\n"
    assert reasoning_prefix("<think>a</think>2-Mismatch</think>") == "<think>a</think>\n"
    # a think block never closed: the answer is forced after it
    assert reasoning_prefix("<think>runs on") == "<think>runs on</think>\n"
    assert reasoning_prefix("") == "</think>\n"


@torch.no_grad()
def test_cot_reads_the_label_after_the_reasoning(model, tokenizer):
    """The distribution equals the logits at the label's index in one forward over the whole
    answer (prompt, reasoning, label and what follows): the position bookkeeping holds."""
    task = Task("relevance", output_format="cot")
    responses = [format_response(r.label, f"reason {r.label} about the query", "cot")
                 for r in RECORDS]
    got = label_probabilities(model, tokenizer, task, RECORDS, responses=responses)
    ids = label_token_ids(tokenizer)
    for i, (record, response) in enumerate(zip(RECORDS, responses)):
        prompt = task.prompt_ids(tokenizer, record)
        before = tokenizer.encode(response[:response.index("</think>") + len("</think>\n")],
                                  add_special_tokens=False)
        whole = prompt + tokenizer.encode(response, add_special_tokens=False)
        assert whole[len(prompt) + len(before)] == ids[record.label - 1]  # the label's digit
        logits = model(torch.tensor([whole]))[0, len(prompt) + len(before) - 1]
        torch.testing.assert_close(got[i], label_distribution(logits.float(), ids),
                                   rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(len(RECORDS)))


@torch.no_grad()
def test_post_cot_reads_the_first_response_position(model, tokenizer):
    task = Task("relevance", output_format="post_cot")
    got = label_probabilities(model, tokenizer, task, RECORDS)
    ids = label_token_ids(tokenizer)
    for i, record in enumerate(RECORDS):
        response = format_response(record.label, "x", "post_cot")
        prompt = task.prompt_ids(tokenizer, record)
        whole = prompt + tokenizer.encode(response, add_special_tokens=False)
        assert whole[len(prompt)] == ids[record.label - 1]
        logits = model(torch.tensor([whole]))[0, len(prompt) - 1]
        torch.testing.assert_close(got[i], label_distribution(logits.float(), ids),
                                   rtol=1e-5, atol=1e-6)


def test_cot_needs_one_response_per_record(model, tokenizer):
    task = Task("relevance", output_format="cot")
    with pytest.raises(ValueError, match="responses"):
        label_probabilities(model, tokenizer, task, RECORDS)
    with pytest.raises(ValueError, match="responses"):
        label_probabilities(model, tokenizer, task, RECORDS, responses=["<think>a</think>\n"])


def test_evaluate_without_latency_probes(model, tokenizer):
    from livethinking.train.common import evaluate
    from livethinking.train.config import JudgeConfig

    task = Task("relevance", output_format="cot")
    kw = dict(max_tokens=6, prompt=task.prompt_ids)
    timed = evaluate(model, tokenizer, RECORDS, task.judges(JudgeConfig()), **kw)
    untimed = evaluate(model, tokenizer, RECORDS, task.judges(JudgeConfig()), probes=0, **kw)
    assert timed.ttft_ms > 0 and untimed.ttft_ms == 0.0 and untimed.tpot_ms == 0.0
    assert untimed.responses == timed.responses  # greedy: the same answers either way
