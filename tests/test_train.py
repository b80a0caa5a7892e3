"""The trainer on the synthetic demo set with a tiny student (CPU): configs, optimizer,
packing, one RFT/GRPO step moving the loss the right way, and exact resume."""

import copy
import json
import math

import pytest
import torch

from livethinking.data import load_records
from livethinking.model import CausalLM
from livethinking.train import (ConfigError, GRPOConfig, LossConfig, OptimConfig, RFTConfig,
                                RolloutConfig, RunConfig, TeacherConfig, load_config, run_grpo,
                                run_rft)
from livethinking.train.optim import MasterWeightAdamW, lr_factor
from livethinking.train.packing import pack_examples

SYSTEM = "Answer from the document."


def _run(tmp_path, **kw):
    return RunConfig(output_dir=str(tmp_path), seed=1, progress=False, tensorboard=False,
                     **kw)


# ------------------------------------------------------------------ configs
def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("model: m\ntrain_data: d\nloss:\n  beta: 0.04\n  loss_type: grpo\n"
                    "rollout:\n  group_size: 4\n")
    config = load_config(GRPOConfig, path, ["loss.beta=0.1", "optim.betas=[0.9, 0.99]",
                                            "reward.judge.kind=rule"])
    assert config.loss.beta == 0.1 and config.loss.loss_type == "grpo"
    assert config.rollout.group_size == 4 and config.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("overrides,match", [
    (["loss.bta=1"], r"unknown key loss\.bta"),
    (["steps=abc"], r"steps: expected int"),
    (["loss.loss_type=ppo"], r"loss\.loss_type: 'ppo' is not one of"),
    (["rollout.group_size=0"], r"group_size must be > 0"),
    (["run.dtype=float64"], r"run\.dtype"),
    (["optim.betas=[0.9]"], r"betas must be two numbers"),
    (["nonsense"], r"must look like key=value"),
    (["run.eval_every=2"], r"eval_every \(2\) needs eval_data"),
    (["run.eval_max_tokens=0"], r"eval_max_tokens >= 1"),
])
def test_bad_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(GRPOConfig, None, ["model=m", "train_data=d"] + overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RFTConfig, tmp_path / "nope.yaml")


# ------------------------------------------------------------------ optimizer
def test_lr_schedule_edges():
    config = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, config, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, config, 20) == pytest.approx(1.0)
    assert lr_factor(12, config, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, config, 20) == pytest.approx(0.1)


def test_master_weights_update_bf16_params_in_place():
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 4)
    model = torch.nn.Linear(8, 4).bfloat16()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    master_start = [p.detach().float().clone() for p in reference.parameters()]
    config = OptimConfig(lr=1e-2, grad_clip=0.0, min_lr_ratio=1.0)  # constant lr
    ours = MasterWeightAdamW(model.parameters(), config, total_steps=10)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                               weight_decay=0.0)
    weight = model.weight
    version = weight._version
    x = torch.randn(5, 8)
    for _ in range(3):
        model(x.bfloat16()).float().square().sum().backward()
        reference.weight.grad = model.weight.grad.float()
        reference.bias.grad = model.bias.grad.float()
        ours.step()
        theirs.step()
        theirs.zero_grad()
    assert model.weight is weight and weight._version > version  # in place: an engine sees it
    for master, ref, start in zip(ours.master, reference.parameters(), master_start):
        assert torch.allclose(master, ref, atol=1e-6) and not torch.equal(master, start)
    assert torch.equal(model.weight, ours.master[0].bfloat16())


def _trained_optimizer(seed: int, steps: int, *, names=True):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).bfloat16()
    config = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1)
    optimizer = MasterWeightAdamW(model.named_parameters() if names else model.parameters(),
                                  config, total_steps=10)
    x = torch.randn(4, 7)
    for _ in range(steps):
        model(x.bfloat16()).float().square().sum().backward()
        optimizer.step()
    return model, optimizer, x


def test_sharded_optimizer_state_round_trips_exactly(tmp_path):
    """`save_sharded` / `load_sharded` in one process: masters, moments, step counts, lr
    and schedule come back, so the next steps equal the uninterrupted optimizer's; a
    model with other parameters is refused by name; the gathered form of older
    checkpoints still loads (`restore_optimizer`)."""
    from livethinking.train.checkpointing import restore_optimizer
    from livethinking.train.distributed import DistributedContext

    model, optimizer, x = _trained_optimizer(0, 3)
    assert optimizer.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    meta = optimizer.save_sharded(tmp_path / "optimizer", distributed=False)
    legacy = copy.deepcopy(optimizer.state_dict())  # it holds the live tensors
    lr = optimizer.optimizer.param_groups[0]["lr"]
    for _ in range(2):
        model(x.bfloat16()).float().square().sum().backward()
        optimizer.step()
    expected = [m.clone() for m in optimizer.master]
    for restore in ("sharded", "legacy"):
        fresh, resumed, _ = _trained_optimizer(1, 0)  # other weights, no steps taken
        assert resumed.optimizer.param_groups[0]["lr"] != lr
        restore_optimizer(resumed, tmp_path, meta if restore == "sharded" else legacy,
                          DistributedContext())
        assert resumed.optimizer.param_groups[0]["lr"] == lr
        for _ in range(2):
            fresh(x.bfloat16()).float().square().sum().backward()
            resumed.step()
        for a, b in zip(expected, resumed.master):
            assert torch.equal(a, b), restore
        assert torch.equal(fresh[0].weight, expected[0].bfloat16())
    _, other, _ = _trained_optimizer(0, 0, names=False)  # names param.0 ... do not match
    with pytest.raises(ValueError, match="does not match this model's parameters"):
        other.load_sharded(tmp_path / "optimizer", meta, distributed=False)


# ------------------------------------------------------------------ packing
def test_packing_targets_and_masks():
    examples = [([1, 2, 3], [4, 5]), ([6, 7], [8]), ([9] * 12, [10])]
    rows, truncated = pack_examples(examples, 10, seed=0)
    assert truncated == 1  # the 12-token prompt cannot fit a row
    docs = []
    for row in rows:
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == 10
        for a, b in zip(cu, cu[1:]):
            docs.append((row.input_ids[a:b].tolist(), row.targets[a:b].tolist(),
                         row.loss_mask[a:b].tolist()))
    real = [d for d in docs if any(d[2])]
    assert sorted(d[0] for d in real) == [[1, 2, 3, 4, 5], [6, 7, 8]]
    for ids, targets, mask in real:
        trained = [t for t, m in zip(targets, mask) if m]
        prompt_len = 3 if ids[0] == 1 else 2
        assert trained == ids[prompt_len:]  # exactly the response tokens are predicted


# ------------------------------------------------------------------ RFT
def _rft_config(tmp_path, demo_setup, **kw):
    paths, _, student = demo_setup
    base = dict(model=str(student), train_data=str(paths.train), system_prompt=SYSTEM,
                teacher=TeacherConfig(kind="demo", k=2), epochs=3, row_tokens=384,
                rows_per_step=2, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                run=_run(tmp_path))
    base.update(kw)
    return RFTConfig(**base)


def _losses(path):
    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_sft_steps_lower_the_loss_on_a_fixed_batch(demo_setup):
    from livethinking.tasks.livestream import DemoTeacher
    from livethinking.train.common import prompt_ids, response_ids
    from livethinking.train.sft import sft_step

    paths, tokenizer, student = demo_setup
    model = CausalLM.from_pretrained(student).train()
    records = load_records(paths.train).items[:6]
    teacher = DemoTeacher(seed=0, error_rate=0.0)
    examples = [(prompt_ids(tokenizer, r, SYSTEM), response_ids(tokenizer, teacher.respond(r, 1)[0]))
                for r in records]
    rows, _ = pack_examples(examples, 512)
    optimizer = MasterWeightAdamW(model.parameters(), OptimConfig(lr=3e-3, min_lr_ratio=1.0), 8)
    losses = []
    for _ in range(6):
        losses.append(sft_step(model, rows, torch.device("cpu"))["loss"])
        optimizer.step()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0]


def test_sft_filler_rows_are_forwarded_with_no_gradient_and_no_stats(tiny_checkpoint):
    """A rank with fewer rows runs filler rows so that its FSDP forwards and backwards match
    the other ranks': they run, but change neither the gradient nor the statistics."""
    from livethinking.train.sft import sft_step

    examples = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14]), ([15, 16, 17, 18], [19])]
    rows, _ = pack_examples(examples, 8)
    assert len(rows) >= 2

    def run(filler):
        model = CausalLM.from_pretrained(tiny_checkpoint).train()
        forwards = []
        original = model.forward_hidden
        model.forward_hidden = lambda *a, **k: forwards.append(1) or original(*a, **k)
        stats = sft_step(model, rows[:1], torch.device("cpu"), filler_rows=filler)
        return stats, [p.grad.clone() for p in model.parameters()], len(forwards)

    plain, plain_grads, plain_forwards = run([])
    padded, padded_grads, padded_forwards = run(rows[1:] * 2)
    assert (plain_forwards, padded_forwards) == (1, 1 + 2 * len(rows[1:]))
    assert padded == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, padded_grads))


def test_rft_end_to_end_writes_a_loadable_model(tmp_path, demo_setup):
    config = _rft_config(tmp_path, demo_setup, max_steps=4)
    final = run_rft(config, log=lambda *_: None)
    losses = _losses(tmp_path)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    CausalLM.from_pretrained(final)
    accepted = (tmp_path / "rft_accepted.jsonl").read_text().splitlines()
    assert accepted and all(json.loads(a)["response"] for a in accepted)


def test_rft_mixes_language_modelling_texts_into_its_rows(tmp_path, demo_setup, monkeypatch):
    import livethinking.train.rft as rft_module

    paths, tokenizer, _ = demo_setup
    lm = tmp_path / "lm.jsonl"
    texts = ["color: red\nprice: 19 dollars", "# Product: Comet Lamp\n\nsize: small"]
    lm.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    packed = []

    def spy(examples, row_tokens, *, seed):
        packed.append(list(examples))
        return pack(examples, row_tokens, seed=seed)

    pack = rft_module.pack_examples
    monkeypatch.setattr(rft_module, "pack_examples", spy)
    logs = []
    run_rft(_rft_config(tmp_path / "with", demo_setup, max_steps=2, lm_data=str(lm)),
            log=logs.append)
    run_rft(_rft_config(tmp_path / "without", demo_setup, max_steps=2), log=lambda *_: None)
    with_lm, without = packed
    assert with_lm[:len(without)] == without  # the accepted samples, then the texts
    for (first, rest), text in zip(with_lm[len(without):], texts, strict=True):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert first == ids[:1] and rest == ids[1:] + [tokenizer.eos_token_id]
    assert any("2 language-modelling texts" in line for line in logs), logs
    lm.write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="lm.jsonl:1"):
        run_rft(_rft_config(tmp_path / "bad", demo_setup, max_steps=1, lm_data=str(lm)),
                log=lambda *_: None)


def test_rft_resume_is_bit_identical(tmp_path, demo_setup):
    whole = _rft_config(tmp_path / "whole", demo_setup, max_steps=6)
    run_rft(whole, log=lambda *_: None)
    part = _rft_config(tmp_path / "part", demo_setup, max_steps=6,
                       run=_run(tmp_path / "part", save_every=3))
    run_rft(part, log=lambda *_: None)  # leaves a checkpoint at step 3
    assert (tmp_path / "part" / "checkpoints" / "LATEST").read_text() == "step-00000003"
    run_rft(part, resume=True, log=lambda *_: None)  # as if interrupted after step 3
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "part")
    a = CausalLM.from_pretrained(tmp_path / "whole" / "final").state_dict()
    b = CausalLM.from_pretrained(tmp_path / "part" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_is_set_from_the_config(tmp_path, demo_setup, monkeypatch):
    """Top-level ``activation_checkpointing`` reaches the model: every decoder layer is
    recomputed in backward (torch.utils.checkpoint), and the losses are those of a plain
    run."""
    from livethinking.model import model as model_module

    checkpointed = []
    original = model_module.checkpoint

    def spy(function, *args, **kwargs):
        checkpointed.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", spy)
    plain = _rft_config(tmp_path / "plain", demo_setup, max_steps=2)
    run_rft(plain, log=lambda *_: None)
    assert not checkpointed
    config = load_config(RFTConfig, None, [f"model={plain.model}",
                                           f"train_data={plain.train_data}",
                                           "teacher.kind=demo", "activation_checkpointing=true"])
    assert config.activation_checkpointing
    recomputed = _rft_config(tmp_path / "ckpt", demo_setup, max_steps=2,
                             activation_checkpointing=True)
    run_rft(recomputed, log=lambda *_: None)
    assert checkpointed and all(isinstance(f, torch.nn.Module) for f in checkpointed)
    assert _losses(tmp_path / "ckpt") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_rft_evaluates_held_out_prompts_without_changing_training(tmp_path, demo_setup):
    """eval_data + run.eval_every: eval/… rows at step 0, every eval_every steps and at the
    end (plotted); the training rows equal a run without evaluation's, bit for bit."""
    paths = demo_setup[0]
    plain = _rft_config(tmp_path / "plain", demo_setup, max_steps=5)
    run_rft(plain, log=lambda *_: None)
    evaluated = _rft_config(tmp_path / "eval", demo_setup, max_steps=5,
                            eval_data=str(paths.heldout),
                            run=_run(tmp_path / "eval", eval_every=2, eval_max_tokens=8))
    run_rft(evaluated, log=lambda *_: None)
    rows = _rows(tmp_path / "eval")
    evals = [r for r in rows if "eval/correct" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    for r in evals:
        assert 0 <= r["eval/correct"] <= 1 and 0 <= r["eval/helpful"] <= 1
        assert 0 < r["eval/tokens_per_response"] <= 8 and r["eval/ttft_ms"] > 0
    strip = (lambda r: {k: v for k, v in r.items() if not k.endswith("_s")})
    assert [strip(r) for r in rows if "loss" in r] == [strip(r) for r in _rows(tmp_path / "plain")]
    assert (tmp_path / "eval" / "plots" / "held-out_correct_and_helpful.png").is_file()


# ------------------------------------------------------------------ GRPO
def _grpo_config(tmp_path, model, demo_setup, **kw):
    paths, _, _ = demo_setup
    base = dict(model=str(model), train_data=str(paths.train), system_prompt=SYSTEM, steps=2,
                prompts_per_step=2, rollout=RolloutConfig(group_size=4, max_tokens=24),
                loss=LossConfig(beta=0.02), optim=OptimConfig(lr=1e-3), run=_run(tmp_path))
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def rft_model(tmp_path_factory, demo_setup):
    out = tmp_path_factory.mktemp("rft")
    return run_rft(_rft_config(out, demo_setup, max_steps=8), log=lambda *_: None)


def test_grpo_update_moves_logprobs_with_the_advantage(demo_setup, rft_model):
    from livethinking.train.grpo_step import (build_batch, completion_logprobs,
                                              policy_loss_backward)
    from livethinking.train.rollout import Rollout

    paths, tokenizer, _ = demo_setup
    model = CausalLM.from_pretrained(rft_model).train()
    record = load_records(paths.train).items[0]
    prompt = tokenizer.encode("hello", add_special_tokens=False)
    completions = [tokenizer.encode(t, add_special_tokens=False)
                   for t in ("It comes in red.", "It costs 29 dollars.", "Sorry, no.", "Great!")]
    batch = build_batch([Rollout(record, prompt, c, "", None) for c in completions],
                        torch.device("cpu"))
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    before = completion_logprobs(model, batch, 1.0).sum(1)
    optimizer = MasterWeightAdamW(model.parameters(), OptimConfig(lr=1e-3, grad_clip=0), 1)
    policy_loss_backward(model, batch, advantages, old_logprobs=None, ref_logprobs=None,
                         rollout_is_weights=None, loss=LossConfig(), temperature=1.0,
                         max_completion_length=8)
    optimizer.step()
    after = completion_logprobs(model, batch, 1.0).sum(1)
    change = after - before
    # every positive-advantage completion gains, and more than any negative one (one Adam
    # step moves shared tokens too, so a negative one may rise a little)
    assert change[:2].min() > 0 and change[:2].min() > change[2:].max() + 0.5
    assert change[2:].min() < 0


def test_grpo_runs_and_resumes_bit_identically(tmp_path, demo_setup, rft_model):
    whole = _grpo_config(tmp_path / "whole", rft_model, demo_setup, steps=3)
    run_grpo(whole, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("reward/total" in r and "response_tokens" in r for r in rows)
    part = _grpo_config(tmp_path / "part", rft_model, demo_setup, steps=3,
                        run=_run(tmp_path / "part", save_every=2))
    run_grpo(part, log=lambda *_: None)
    run_grpo(part, resume=True, log=lambda *_: None)  # from step 2: repeats step 3
    again = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    strip = (lambda r: {k: v for k, v in r.items() if not k.endswith("_s")})
    assert [strip(r) for r in again] == [strip(r) for r in rows]


def test_grpo_evaluates_held_out_prompts_and_resume_does_not_repeat_it(tmp_path, demo_setup,
                                                                        rft_model):
    paths = demo_setup[0]
    run = (lambda **kw: _run(tmp_path, eval_every=2, eval_max_tokens=8, **kw))
    config = _grpo_config(tmp_path, rft_model, demo_setup, steps=3, eval_data=str(paths.heldout),
                          run=run(save_every=2))
    run_grpo(config, log=lambda *_: None)
    run_grpo(config, resume=True, log=lambda *_: None)  # from step 2
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows if "eval/correct" in r] == [0, 2, 3]
    assert [r["step"] for r in rows if "reward/total" in r] == [1, 2, 3]


def test_prompt_stream_is_a_seeded_permutation_per_epoch_and_resumes():
    from livethinking.train.grpo import PromptStream

    whole = PromptStream(7, seed=3).take(20)
    split = PromptStream(7, seed=3)
    assert split.take(5) + split.take(15) == whole
    assert PromptStream(7, seed=3, cursor=9).take(11) == whole[9:]  # resume from a cursor
    for epoch in range(2):
        assert sorted(i for i, _ in whole[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert [i for i, _ in whole[:7]] != [i for i, _ in whole[7:14]]  # a new order each epoch
    assert [c for _, c in whole] == list(range(20))


def test_grpo_engine_sleeps_while_training_with_the_same_run(tmp_path, demo_setup, rft_model,
                                                             monkeypatch):
    """``rollout.free_cache_engine`` (the default): the engine's KV pool is released during
    every update and taken back for the rollouts; the run's metrics equal a run whose
    engine keeps its pool."""
    from livethinking.train import grpo as grpo_module

    asleep = []
    update = grpo_module.GRPOTrainer.update

    def watched(self, *args, **kwargs):
        asleep.append(self.llm.is_sleeping)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(grpo_module.GRPOTrainer, "update", watched)
    rows = {}
    for free in (True, False):
        config = _grpo_config(tmp_path / str(free), rft_model, demo_setup,
                              rollout=RolloutConfig(group_size=4, max_tokens=24,
                                                    free_cache_engine=free))
        run_grpo(config, log=lambda *_: None)
        rows[free] = [json.loads(x) for x in
                      (tmp_path / str(free) / "metrics.jsonl").read_text().splitlines()]
    assert asleep == [True, True, False, False]
    drop = ("_s", "_per_s")  # timings differ
    for a, b in zip(rows[True], rows[False]):
        assert {k: v for k, v in a.items() if not k.endswith(drop)} == \
            {k: v for k, v in b.items() if not k.endswith(drop)}
