"""The relevance demo (TaoSR1) at CI size through the command line: every stage runs (CoT
SFT, pass@N DPO, difficulty-aware GRPO, CumPT), the report files, and the relevance data
command."""

import json

import pytest

from livethinking.cli import main
from livethinking.tasks.relevance import load_relevance_records

STAGES = ["before training", "after CoT SFT", "after pass@N DPO", "after GRPO"]


def _quick_demo(out, *extra):
    """(exit code, out) of the quick relevance demo, the caller's torch threads restored."""
    import torch

    threads = torch.get_num_threads()
    try:
        code = main(["demo", "--task", "relevance", "--size", "quick", *extra, "--threads", "1",
                     "--quiet", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return code, out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _quick_demo(tmp_path_factory.mktemp("relevance_demo"))


def test_every_stage_runs_and_is_reported(quick_run):
    code, out = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["model"] for r in rows] == STAGES
    for r in rows:
        for key in ("accuracy", "macro_f1", "cumpt_accuracy", "cumpt_macro_f1", "format",
                    "argmax_accuracy", "decoded_unparseable"):
            assert 0.0 <= r[key] <= 1.0, (r["model"], key)
        assert 0.0 <= r["cumpt_tau"] <= 1.0
        # reading the label first is one prefill; the full CoT decodes every token after it
        assert 0 < r["label_first_ms"] < r["full_cot_ms"]
        assert r["full_cot_ms"] == pytest.approx(r["ttft_ms"] + r["tokens_per_response"]
                                                 * r["tpot_ms"])
        assert len(r["examples"]) == 2
    # SFT teaches the format: the untrained student's labels never parse; after SFT most
    # do (the quick H=64 student still writes some labels whose digit and tier disagree)
    assert rows[0]["decoded_unparseable"] > 0.9 and rows[1]["decoded_unparseable"] < 0.8
    assert rows[1]["format"] > rows[0]["format"]
    md = (out / "results.md").read_text()
    assert all(s in md for s in STAGES) and "CumPT" in md and "stages.png" in md
    assert (out / "stages.png").stat().st_size > 1000


def test_the_stages_hand_their_outputs_on(quick_run):
    _, out = quick_run
    accuracy = [json.loads(x) for x in (out / "dpo" / "pass_at_n.jsonl").read_text().splitlines()]
    train = load_relevance_records(out / "data" / "train.jsonl").items
    assert {a["id"] for a in accuracy} == {r.id for r in train}
    assert all(a["n"] == 4 and a["accuracy"] * 4 == round(a["accuracy"] * 4) for a in accuracy)
    pairs = [json.loads(x) for x in (out / "dpo" / "dpo_pairs.jsonl").read_text().splitlines()]
    by_id = {a["id"]: a["accuracy"] for a in accuracy}
    assert pairs and all(0 < by_id[p["id"]] < 1 for p in pairs)  # mixed prompts only
    grpo = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(grpo) == 4 and all("difficulty/kept_fraction" in r for r in grpo)
    sft = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft[-1]["loss"] < sft[0]["loss"] / 2


def test_relevance_data_command(tmp_path, capsys):
    assert main(["data", "make-demo", "--task", "relevance", "--out", str(tmp_path / "d"),
                 "--products", "20", "--questions-per-product", "4"]) == 0
    assert "relevance records" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "d").iterdir()} == {
        "catalogue.json", "train.jsonl", "dev.jsonl", "heldout.jsonl", "corpus.txt"}
    assert main(["data", "make-demo", "--task", "relevance", "--out", str(tmp_path / "e"),
                 "--rl-products", "3"]) == 2
    assert "livestream options" in capsys.readouterr().err
    assert main(["data", "make-demo", "--task", "relevance", "--out", str(tmp_path / "f"),
                 "--products", "0"]) == 2


@pytest.fixture(scope="module")
def quick_label_first_run(tmp_path_factory):
    return _quick_demo(tmp_path_factory.mktemp("relevance_demo_post_cot"), "--format", "post_cot")


def test_label_first_demo_trains_the_first_token_on_its_own_data(quick_label_first_run):
    """post_cot: label-first SFT on the extra label queries in the query_doc_query layout,
    then DPO and GRPO in that layout; the first token carries the tier after SFT."""
    code, out = quick_label_first_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["size"]["output_format"] == "post_cot"
    rows = results["rows"]
    assert [r["model"] for r in rows] == ["before training", "after label-first SFT",
                                          "after pass@N DPO", "after GRPO"]
    extra = load_relevance_records(out / "data" / "label_train.jsonl").items
    assert len(extra) == results["size"]["label_products"] * results["size"]["queries_per_product"]
    # SFT teaches the label-first format (the quick H=64 student, 200 steps, no more)
    assert rows[1]["format"] > rows[0]["format"]
    assert rows[1]["decoded_unparseable"] < rows[0]["decoded_unparseable"]
    for r in rows:
        assert 0.0 <= r["argmax_accuracy"] <= 1.0 and 0 < r["label_first_ms"] < r["full_cot_ms"]
    assert (out / "sft" / "config.json").exists()


def test_the_report_names_the_format(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["size"]["output_format"] == "cot" and results["size"]["name"] == "quick"
    assert "Format `cot`" in (out / "results.md").read_text()


def test_demo_format_settings(tmp_path, capsys):
    from livethinking.train.relevance_demo import RelevanceDemoSize

    with pytest.raises(ValueError, match="output_format"):
        RelevanceDemoSize(output_format="label_only")
    assert RelevanceDemoSize(output_format="post_cot").name() == "default"
    assert RelevanceDemoSize(output_format="post_cot", hidden=96).name() == "custom"
    assert main(["demo", "--format", "post_cot", "--quiet", "--out", str(tmp_path)]) == 1
    assert "--task relevance" in capsys.readouterr().err
