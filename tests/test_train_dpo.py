"""The DPO trainer: pass@N pairs (edge cases), pairs files, the loss of one big batch
across microbatches, a run that learns the preference and resumes bit for bit."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from livethinking.data import LivestreamRecord, load_records
from livethinking.model import CausalLM
from livethinking.rewards import Verdict
from livethinking.train import ConfigError, load_config
from livethinking.train.config import DPOConfig, OptimConfig, RunConfig
from livethinking.train.distributed import DistributedContext
from livethinking.train.dpo import DPOTrainer, run_dpo
from livethinking.train.loop import TrainingRun
from livethinking.train.pairs import build_pairs, load_pairs

SYSTEM = "Answer from the document."


class _ContainsJudge:
    """Correct iff the response contains "yes" (a stand-in correctness judge)."""

    def judge_many(self, records, responses):
        return [Verdict(float("yes" in r), "") for r in responses]


def _record(i):
    return LivestreamRecord(id=f"r{i}", product_doc="doc", question="q?")


# ------------------------------------------------------------------ pairs
def test_pass_at_n_pairs_edge_cases():
    records = [_record(i) for i in range(5)]
    samples = {"r0": ["yes a", "no a", "no b", "yes a"],  # mixed, a duplicate
               "r1": ["yes", "yes!"],  # all right
               "r2": ["no", "nope"],  # all wrong
               "r3": [],  # no samples
               "r4": ["no x", "yes y", "no z"]}
    pairs, stats, accuracy = build_pairs(records, samples, _ContainsJudge(), pairs_per_prompt=3)
    assert stats == {"prompts": 5, "samples": 11, "pairs": 4, "skipped_all_correct": 1,
                     "skipped_all_wrong": 1, "skipped_no_samples": 1}
    assert accuracy == {"r0": 0.5, "r1": 1.0, "r2": 0.0, "r4": pytest.approx(1 / 3)}
    by_prompt = {}
    for p in pairs:
        assert "yes" in p.chosen and "yes" not in p.rejected
        by_prompt.setdefault(p.record.id, []).append((p.chosen, p.rejected))
    # distinct texts before repeats: r0 has 1 distinct right and 2 wrong -> 2 pairs, not 3
    assert by_prompt == {"r0": [("yes a", "no a"), ("yes a", "no b")],
                         "r4": [("yes y", "no x"), ("yes y", "no z")]}
    one, _, _ = build_pairs(records, samples, _ContainsJudge())
    assert [(p.record.id, p.chosen, p.rejected) for p in one] == [
        ("r0", "yes a", "no a"), ("r4", "yes y", "no x")]
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        build_pairs(records, samples, _ContainsJudge(), pairs_per_prompt=0)


def test_pairs_file_errors_name_the_line(tmp_path):
    records = [_record(0)]
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "r0", "chosen": "a", "rejected": "b"}\n\n')
    assert [(p.chosen, p.rejected) for p in load_pairs(path, records)] == [("a", "b")]
    for text, match in [('{"id": "r9", "chosen": "a", "rejected": "b"}', "r9.*not a record"),
                        ('{"id": "r0", "chosen": 1, "rejected": "b"}', ":1: chosen"),
                        ("[1]", ":1: expected an object"), ("{", ":1: invalid JSON"), ("", "no pairs")]:
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=match):
            load_pairs(path, records)


def test_dpo_config_is_validated():
    base = ["model=m", "train_data=d"]
    for overrides, match in [(["beta=0"], "beta must be > 0"),
                             (["label_smoothing=0.5"], "label_smoothing"),
                             (["sft_weight=-1"], "sft_weight"),
                             (["output_format=post_cot"], "relevance settings"),
                             (["task=relevance", "judge.kind=llm", "judge.base_url=u",
                               "judge.model=m"], "judged by rule"),
                             (["sampling.n=0"], "n must be > 0")]:
        with pytest.raises(ConfigError, match=match):
            load_config(DPOConfig, None, base + overrides)


# ------------------------------------------------------------------ the trainer
def _pairs_file(path, records):
    """chosen: the reference answer; rejected: a refusal or a wrong colour."""
    rows = []
    for r in records:
        rejected = "Sorry, I do not know." if "not" not in (r.reference or "") else "It is red."
        rows.append({"id": r.id, "chosen": r.reference, "rejected": rejected})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(tmp_path, model, demo_setup, **kw):
    paths, _, _ = demo_setup
    records = load_records(paths.train).items
    base = dict(model=str(model), train_data=str(paths.train), system_prompt=SYSTEM,
                pairs=str(_pairs_file(tmp_path / "pairs.jsonl", records)), beta=0.5,
                pairs_per_step=4, max_steps=6,
                optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0, grad_clip=0.0),
                run=RunConfig(output_dir=str(tmp_path / "run"), seed=1, progress=False,
                              tensorboard=False, plots=False))
    base.update(kw)
    return DPOConfig(**base)


def _prepared(config, model_dir):
    model = CausalLM.from_pretrained(model_dir).train()
    from transformers import AutoTokenizer

    trainer = DPOTrainer(config)
    run = TrainingRun(Path(config.run.output_dir), torch.device("cpu"), torch.float32, DistributedContext(), model_dir, None,
                      model, AutoTokenizer.from_pretrained(model_dir), lambda *_: None)
    run.out.mkdir(parents=True, exist_ok=True)
    trainer.prepare(run)
    return trainer, run


@pytest.mark.parametrize("sft_weight,label_smoothing", [(0.0, 0.0), (0.7, 0.1)])
def test_microbatches_give_the_loss_and_gradients_of_one_batch(tmp_path, demo_setup,
                                                                sft_weight, label_smoothing):
    _, _, student = demo_setup
    grads, stats = [], []
    for budget in (1 << 20, 64):
        config = _config(tmp_path / str(budget), student, demo_setup, pairs_per_step=7,
                         micro_batch_tokens=budget, sft_weight=sft_weight, aux_loss=False,
                         label_smoothing=label_smoothing)
        trainer, run = _prepared(config, student)
        trainer.reference = trainer.reference + torch.randn(  # reference ≠ policy
            trainer.reference.shape, generator=torch.Generator().manual_seed(3))
        if budget == 64:
            assert len(trainer._micro_groups(trainer.step_pairs(0))) > 2
        captured = []
        run.optimizer = SimpleNamespace(step=lambda: captured.append(
            [p.grad.clone() for p in run.model.parameters()]) or {})
        run.model.zero_grad()
        stats.append(trainer.step(0))
        grads.append(captured[0])
    for key in ("loss", "dpo_loss", "nll", "rewards/margins", "rewards/accuracies",
                "logps/chosen"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-6), key
    scale = max(float(g.abs().max()) for g in grads[0])
    for whole, micro in zip(*grads):
        torch.testing.assert_close(micro, whole, rtol=0, atol=2e-5 * scale)


def test_reference_logprobs_are_the_starting_policys(tmp_path, demo_setup):
    _, _, student = demo_setup
    trainer, run = _prepared(_config(tmp_path, student, demo_setup), student)
    model = run.model
    for i in (0, len(trainer.rows) - 1):
        for j, row in enumerate(trainer.rows[i]):
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            with torch.no_grad():
                logits = model(ids)[0].double()
            p = len(row.prompt_ids)
            logp = torch.log_softmax(logits, -1)[p - 1:-1].gather(
                1, torch.tensor(row.completion_ids)[:, None]).sum()
            assert float(trainer.reference[i, j]) == pytest.approx(float(logp), rel=1e-5)


def test_dpo_learns_the_preference_and_resumes_bit_identically(tmp_path, demo_setup):
    _, _, student = demo_setup
    whole = _config(tmp_path / "whole", student, demo_setup)
    final = run_dpo(whole, log=lambda *_: None)
    assert (final / "config.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "whole" / "run" / "metrics.jsonl")
            .read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert rows[-1]["rewards/margins"] > 0.5 and rows[-1]["dpo_loss"] < 0.5
    assert rows[-1]["rewards/accuracies"] == 1.0
    saved = [json.loads(x) for x in (tmp_path / "whole" / "run" / "dpo_pairs.jsonl")
             .read_text().splitlines()]
    assert len(saved) == len(load_records(demo_setup[0].train).items)
    assert all({"ref_chosen", "ref_rejected"} <= set(s) for s in saved)
    part = _config(tmp_path / "part", student, demo_setup,
                   run=RunConfig(output_dir=str(tmp_path / "part" / "run"), seed=1,
                                 progress=False, tensorboard=False, plots=False, save_every=4))
    run_dpo(part, log=lambda *_: None)
    run_dpo(part, resume=True, log=lambda *_: None)
    again = [json.loads(x) for x in (tmp_path / "part" / "run" / "metrics.jsonl")
             .read_text().splitlines()]
    strip = (lambda r: {k: v for k, v in r.items() if not k.endswith("_s")})
    assert [strip(r) for r in again] == [strip(r) for r in rows]
