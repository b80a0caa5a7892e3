"""The embedded demo end to end in its reduced (CI) size, through the command line."""

import json
import pathlib

from livethinking.cli import main
from livethinking.train import GRPOConfig, RFTConfig, load_config


def test_demo_quick_runs_end_to_end(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    labels = [r["model"] for r in results["rows"]]
    assert labels == ["student before training", "after RFT", "after GRPO"]
    for row in results["rows"]:
        assert 0.0 <= row["correct"] <= 1.0 and 0.0 <= row["helpful"] <= 1.0
        assert row["tokens_per_response"] > 0 and row["ttft_ms"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 5 and "after GRPO" in table
    assert (tmp_path / "rft" / "final" / "config.json").is_file()
    assert (tmp_path / "grpo" / "final" / "model.safetensors").is_file()
    assert any((tmp_path / "grpo" / "plots").glob("*.png"))
    assert (tmp_path / "data" / "heldout.jsonl").is_file()


def test_shipped_configs_load():
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    assert load_config(RFTConfig, root / "rft.yaml").teacher.kind == "openai"
    assert load_config(GRPOConfig, root / "grpo.yaml").reward.length_needs_correct
