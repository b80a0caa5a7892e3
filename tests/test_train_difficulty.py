"""Difficulty-aware GRPO sampling: the filter, the offline estimate, the picks a run draws,
online re-estimation from the rollout groups, and resume."""

import json

import pytest
import torch

from livethinking.data import load_records
from livethinking.rewards import Verdict
from livethinking.train import (DifficultyConfig, GRPOConfig, GRPOTrainer, LossConfig,
                                OptimConfig, RolloutConfig, RunConfig, run_grpo)
from livethinking.train.difficulty import DifficultyFilter, read_accuracies

SYSTEM = "Answer from the document."


def test_filter_keeps_the_open_interval_and_unestimated_prompts():
    f = DifficultyFilter(DifficultyConfig(enabled=True, low=0.1, high=0.95), list("abcdef"))
    f.update({"a": 0.0, "b": 0.1, "c": 0.5, "d": 0.95, "e": 1.0})
    assert [f.keeps(i) for i in "abcdef"] == [False, False, True, False, False, True]
    stats = f.stats()
    assert stats["difficulty/kept_fraction"] == pytest.approx(2 / 6)
    assert stats["difficulty/estimated_fraction"] == pytest.approx(5 / 6)
    assert stats["difficulty/acc_0.0-0.2"] == pytest.approx(2 / 5)  # 0.0 and 0.1
    assert stats["difficulty/acc_0.4-0.6"] == pytest.approx(1 / 5)
    assert stats["difficulty/acc_0.8-1.0"] == pytest.approx(2 / 5)  # 0.95 and 1.0
    assert sum(v for k, v in stats.items() if "acc_" in k) == pytest.approx(1.0)
    f.update({"a": 0.5})  # a newer estimate replaces the old one
    assert f.keeps("a")
    other = DifficultyFilter(f.config, list("abcdef"))
    other.load_state(f.state())
    assert other.accuracy == f.accuracy
    for low, high in [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.1)]:
        with pytest.raises(ValueError, match="low < high"):
            DifficultyConfig(low=low, high=high)


def test_accuracy_file_is_read_and_checked(tmp_path):
    path = tmp_path / "acc.jsonl"
    path.write_text('{"id": "a", "accuracy": 0.25}\n{"id": "zz", "accuracy": 1}\n')
    assert read_accuracies(path, ["a", "b"]) == {"a": 0.25}
    for text, match in [('{"id": "a", "accuracy": 2}', "accuracy must be"),
                        ('{"id": 1, "accuracy": 0.5}', "id must be"), ("{", "invalid JSON")]:
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=r"acc\.jsonl:1"):
            read_accuracies(path, ["a"])
        with pytest.raises(ValueError, match=match):
            read_accuracies(path, ["a"])


@pytest.fixture(scope="module")
def rft_model(tmp_path_factory, demo_setup):
    from livethinking.train import RFTConfig, TeacherConfig, run_rft

    paths, _, student = demo_setup
    out = tmp_path_factory.mktemp("rft")
    config = RFTConfig(model=str(student), train_data=str(paths.train), system_prompt=SYSTEM,
                       teacher=TeacherConfig(kind="demo", k=2), max_steps=8, row_tokens=384,
                       rows_per_step=2, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                       run=RunConfig(output_dir=str(out), seed=1, progress=False,
                                     tensorboard=False, plots=False))
    return run_rft(config, log=lambda *_: None)


def _config(tmp_path, model, demo_setup, difficulty, **kw):
    paths, _, _ = demo_setup
    base = dict(model=str(model), train_data=str(paths.train), system_prompt=SYSTEM, steps=3,
                prompts_per_step=2, rollout=RolloutConfig(group_size=4, max_tokens=16),
                loss=LossConfig(), optim=OptimConfig(lr=1e-3), difficulty=difficulty,
                run=RunConfig(output_dir=str(tmp_path), seed=1, progress=False,
                              tensorboard=False, plots=False))
    base.update(kw)
    return GRPOConfig(**base)


def _spy_picks(monkeypatch):
    drawn = []
    original = GRPOTrainer.rollouts

    def rollouts(self, picks):
        drawn.extend(self.records[i].id for i, _ in picks)
        return original(self, picks)

    monkeypatch.setattr(GRPOTrainer, "rollouts", rollouts)
    return drawn


def test_grpo_draws_only_prompts_inside_the_band(tmp_path, demo_setup, rft_model, monkeypatch):
    paths, _, _ = demo_setup
    records = load_records(paths.train).items
    # every third prompt solvable-but-not-solved; the rest solved or hopeless
    accuracy = {r.id: (0.5 if i % 3 == 0 else (1.0 if i % 2 else 0.0))
                for i, r in enumerate(records)}
    path = tmp_path / "acc.jsonl"
    path.write_text("".join(json.dumps({"id": k, "accuracy": v}) + "\n"
                            for k, v in accuracy.items()))
    drawn = _spy_picks(monkeypatch)
    config = _config(tmp_path / "run", rft_model, demo_setup,
                     DifficultyConfig(enabled=True, accuracy_file=str(path), online=False),
                     dynamic_sampling=False)
    run_grpo(config, log=lambda *_: None)
    assert len(drawn) == 3 * 2 and {accuracy[i] for i in drawn} == {0.5}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = sum(v == 0.5 for v in accuracy.values()) / len(accuracy)
    assert all(r["difficulty/kept_fraction"] == pytest.approx(kept) for r in rows)
    assert all(r["difficulty/fallback"] == 0.0 for r in rows)
    assert rows[0]["difficulty/acc_0.4-0.6"] == pytest.approx(kept)


class _ParityJudge:
    """Correct iff the response has an even number of characters: an untrained model's
    accuracy then spreads over (0, 1), which the real judge's (all 0) would not."""

    def judge_many(self, records, responses):
        return [Verdict(float(len(r) % 2 == 0), "") for r in responses]


def test_grpo_estimates_offline_then_online_and_resumes(tmp_path, demo_setup, rft_model,
                                                        monkeypatch):
    from livethinking.rewards import RuleHelpfulnessJudge
    from livethinking.train.tasks import Task

    monkeypatch.setattr(Task, "judges", lambda self, config: (_ParityJudge(),
                                                               RuleHelpfulnessJudge()))
    paths, _, _ = demo_setup
    n = len(load_records(paths.train).items)
    difficulty = DifficultyConfig(enabled=True, low=0.0, high=1.0, samples=3)
    logs = []
    whole = _config(tmp_path / "whole", rft_model, demo_setup, difficulty)
    run_grpo(whole, log=logs.append)
    assert any("difficulty filter keeps" in line for line in logs)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text()
            .splitlines()]
    assert all(r["difficulty/estimated_fraction"] == 1.0 for r in rows)  # offline: every prompt
    # the histogram's bins hold multiples of 1/n; the kept prompts are those with 0 < p < 1
    for r in rows:
        assert sum(v for k, v in r.items() if "acc_" in k) == pytest.approx(1.0)
        assert (r["difficulty/kept_fraction"] * n) == pytest.approx(
            round(r["difficulty/kept_fraction"] * n))
    # online: a step's groups replace their prompts' estimates (here: 1/4-multiples)
    part = _config(tmp_path / "part", rft_model, demo_setup, difficulty,
                   run=RunConfig(output_dir=str(tmp_path / "part"), seed=1, progress=False,
                                 tensorboard=False, plots=False, save_every=2))
    run_grpo(part, log=lambda *_: None)
    checkpoint = sorted((tmp_path / "part").glob("checkpoints/step-*"))[-1]
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["difficulty"]
    assert len(state) == n and any(abs(v * 4 - round(v * 4)) < 1e-9 and
                                   abs(v * 3 - round(v * 3)) > 1e-9 for v in state.values())
    run_grpo(part, resume=True, log=lambda *_: None)  # from step 2: the table comes back
    again = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text()
             .splitlines()]
    strip = (lambda r: {k: v for k, v in r.items() if not k.endswith("_s")})
    assert [strip(r) for r in again] == [strip(r) for r in rows]


def test_a_filter_that_keeps_nothing_falls_back_to_every_prompt(tmp_path, demo_setup, rft_model,
                                                                monkeypatch):
    paths, _, _ = demo_setup
    records = load_records(paths.train).items
    path = tmp_path / "acc.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "accuracy": 1.0}) + "\n" for r in records))
    drawn = _spy_picks(monkeypatch)
    config = _config(tmp_path / "run", rft_model, demo_setup,
                     DifficultyConfig(enabled=True, accuracy_file=str(path), online=False),
                     dynamic_sampling=False, steps=2)
    run_grpo(config, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(drawn) == 2 * 2 and [r["difficulty/fallback"] for r in rows] == [1.0, 1.0]
    assert all(r["difficulty/kept_fraction"] == 0.0 for r in rows)
