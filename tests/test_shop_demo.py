"""The shop demo at CI size: every stage runs and reports on held-out shoppers."""

import json

import pytest
from transformers import AutoTokenizer

from livethinking.cli import main
from livethinking.train.shop_demo import ShopDemoSize, run_shop_demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("shop-demo")
    return out, run_shop_demo(out, size=ShopDemoSize.quick(), quiet=True)


def test_the_shop_demo_reports_every_stage_on_heldout_shoppers(quick):
    out, results = quick
    assert [r["stage"] for r in results["rows"]] == ["before training", "after SFT",
                                                     "after GRPO"]
    assert results["size"]["name"] == "quick"
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert "| after GRPO |" in table and "full success" in table
    assert (results["tasks"]["train"], results["tasks"]["seen"], results["tasks"]["new"]) == (
        8, 8, 4)
    for row in results["rows"]:
        for kind in ("train", "seen", "new"):
            r = row[kind]
            assert r["episodes"] == results["tasks"][kind]
            assert 0.0 <= r["strict"] <= 1.0 and 0.0 <= r["loose"] <= 1.0
            assert 1.0 <= r["turns"] <= ShopDemoSize.quick().max_turns
            assert 0 < r["model_tokens"] < r["tokens"] <= 512
            assert r["prefix_hit"] > 0.5  # each turn's prompt is the previous one, extended
    assert results["pretrain_s"] > 0 and results["sft_s"] > 0 and results["grpo_s"] > 0
    texts = (out / "data" / "pretrain.jsonl").read_text().splitlines()
    assert len(texts) == ShopDemoSize.quick().pretrain_episodes
    experts = (out / "data" / "expert.jsonl").read_text().splitlines()
    assert len(experts) == (1 + ShopDemoSize.quick().relabelled_copies) * results["num_train"]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    for line in (out / "data" / "catalogue.jsonl").read_text().splitlines()[:50]:
        product_id = json.loads(line)["id"]  # one token each, inside JSON or after a space
        assert len(tokenizer.encode(f'"{product_id}"', add_special_tokens=False)) == 3
        assert product_id in tokenizer.tokenize(f"Order placed for {product_id}.")
    for kind in ("train", "seen"):
        before, sft = results["rows"][0][kind], results["rows"][1][kind]
        # the random student's turns are no tool calls; SFT teaches the format (at CI
        # size about half the bad calls go: 6 -> 2.8 per episode, seed 0)
        assert before["tool_errors"] >= 0.9 * before["turns"]
        assert sft["tool_errors"] < 0.75 * before["tool_errors"]


def test_the_cli_rejects_sizes_the_shop_demo_lacks(tmp_path, capsys):
    assert main(["demo", "--task", "shop", "--size", "large", "--out", str(tmp_path)]) == 1
    assert "sizes quick and default" in capsys.readouterr().err
    assert main(["data", "make-demo", "--task", "shop", "--out", str(tmp_path / "d"),
                 "--families", "3", "--heldout-families", "1"]) == 0
    experts = (tmp_path / "d" / "expert.jsonl").read_text().count("task_id")
    assert 3 <= experts <= 6  # 1 or 2 training shoppers per family (2 or 4 variants)
    assert main(["data", "make-demo", "--task", "shop", "--out", str(tmp_path / "e"),
                 "--heldout-families", "0"]) == 2
