"""Agent training: masked packing, trajectory rows, the microbatched multi-turn loss (token
and chunk credit) against one whole-batch pass, and SFT → GRPO runs on a tiny shop."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from livethinking.engine import LLM
from livethinking.envs import ShopConfig, ShopEnvironment, make_shop_demo
from livethinking.model import CausalLM
from livethinking.rollout import TrajectoryConfig, TurnRenderer, run_trajectories
from livethinking.tasks.shop import load_shop_tasks
from livethinking.train.agent import (AgentGRPOTrainer, evaluate_agent, run_agent_grpo,
                                      run_agent_sft, trajectory_batch)
from livethinking.train.agent_config import AgentGRPOConfig, AgentSFTConfig, EnvConfig
from livethinking.train.config import LossConfig, OptimConfig, RunConfig
from livethinking.train.packing import pack_examples, pack_masked


def test_pack_masked_trains_exactly_the_masked_tokens():
    examples = [([5, 6, 7, 8, 9], [0, 1, 0, 1, 1]), ([1, 2, 3], [0, 0, 1])]
    rows, truncated = pack_masked(examples, 8, seed=0)
    assert truncated == 0 and sum(r.num_loss_tokens for r in rows) == 4
    for row in rows:
        for doc_start, doc_end in zip(row.cu_seqlens[:-1].tolist(), row.cu_seqlens[1:].tolist()):
            tokens = row.input_ids[doc_start:doc_end].tolist()
            match = [e for e in examples if e[0] == tokens]
            if not match:
                continue  # padding
            (_, mask), = match
            trained = row.loss_mask[doc_start:doc_end - 1].tolist()
            assert trained == [bool(m) for m in mask[1:]]
            assert row.targets[doc_start:doc_end - 1].tolist() == tokens[1:]
    # a first token is never a target; an example without targets is dropped and counted
    assert pack_masked([([1, 2], [1, 0])], 8) == ([], 1)
    with pytest.raises(ValueError, match="2 tokens but 3 mask values"):
        pack_masked([([1, 2], [0, 1, 1])], 8)
    # pack_examples is the (prompt, response) case of it
    rows, _ = pack_examples([([1, 2], [3, 4])], 8)
    assert rows[0].loss_mask.tolist()[:3] == [False, True, True]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    from livethinking.train.demo import DemoSize, build_student, build_tokenizer

    root = tmp_path_factory.mktemp("shop")
    paths = make_shop_demo(root / "data", num_families=6, heldout_families=2, seed=1)
    tokenizer = build_tokenizer(paths.corpus, root / "tok")
    student = build_student(tokenizer, DemoSize(hidden=32, layers=2, experts=4),
                            root / "student", 0)
    env = EnvConfig(name="shop", config={"catalogue": str(paths.catalogue), "max_turns": 4})
    return SimpleNamespace(root=root, paths=paths, tokenizer=tokenizer, student=student,
                           env=env)


def _trajectories(shop, model, n=4, turns=3):
    tasks = load_shop_tasks(shop.paths.train)[:n // 2]
    tasks = [t for t in tasks for _ in range(2)]
    envs = [ShopEnvironment(ShopConfig(catalogue=str(shop.paths.catalogue), max_turns=turns))
            for _ in tasks]
    llm = LLM(model, shop.tokenizer, num_kv_blocks=256)
    return run_trajectories(llm, TurnRenderer(shop.tokenizer, envs[0].tools()), envs, tasks,
                            TrajectoryConfig(max_turns=turns, max_turn_tokens=12,
                                             max_total_tokens=400), list(range(len(tasks))))


@pytest.mark.parametrize("credit, loss_type", [("chunk", "dapo"), ("token", "dapo"),
                                               ("token", "grpo")])
def test_microbatches_add_up_to_the_whole_batch(shop, credit, loss_type):
    """The trainer's minibatch pass split into one-row microbatches gives the loss and the
    gradients of one pass over all rows (chunk credit divides every microbatch by the
    minibatch's turn count)."""
    torch.manual_seed(0)
    model = CausalLM.from_pretrained(shop.student)
    trajectories = _trajectories(shop, model)
    batch = trajectory_batch(trajectories, torch.device("cpu"))
    lengths = [len(t) for t in trajectories]
    advantages = torch.randn(len(trajectories))
    old = batch.sampler_logprobs + 0.05 * torch.randn_like(batch.mask) * batch.mask

    def run(budget):
        config = AgentGRPOConfig(model="m", train_data="t", micro_batch_tokens=budget,
                                 aux_loss=False, loss=LossConfig(credit=credit,
                                                                 loss_type=loss_type))
        trainer = AgentGRPOTrainer(config)
        trainer.run = SimpleNamespace(model=model, device=torch.device("cpu"))
        model.zero_grad()
        stats = trainer._minibatch(batch, list(range(len(trajectories))), lengths, advantages,
                                   old, None)
        return stats["loss"], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = run(100000)
    split, split_grads = run(1)  # each row alone
    assert whole != 0.0
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-7)
    for a, b in zip(whole_grads, split_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_environment_tokens_get_no_gradient(shop):
    """Changing what the environment said (targets at unmasked positions) changes nothing
    of the loss: only the model's own tokens are scored."""
    model = CausalLM.from_pretrained(shop.student)
    (t,) = _trajectories(shop, model, n=2)[:1]
    batch = trajectory_batch([t], torch.device("cpu"))
    env_positions = (batch.mask == 0) & (torch.arange(batch.mask.shape[1]) < len(t.token_ids))
    assert env_positions.any()
    trainer = AgentGRPOTrainer(AgentGRPOConfig(model="m", train_data="t", aux_loss=False))
    trainer.run = SimpleNamespace(model=model, device=torch.device("cpu"))
    first = trainer._minibatch(batch, [0], [len(t)], torch.tensor([1.0]), None, None)["loss"]
    batch.targets[env_positions] = (batch.targets[env_positions] + 1) % 50
    second = trainer._minibatch(batch, [0], [len(t)], torch.tensor([1.0]), None, None)["loss"]
    assert first == second


def test_agent_sft_then_grpo_runs_checkpoints_and_is_evaluated(shop, tmp_path):
    run = (lambda name, **kw: RunConfig(output_dir=str(tmp_path / name), progress=False,
                                        tensorboard=False, plots=False, **kw))
    sft = run_agent_sft(AgentSFTConfig(model=str(shop.student), train_data=str(shop.paths.expert),
                                       env=shop.env, max_steps=3, row_tokens=1024,
                                       rows_per_step=2, optim=OptimConfig(lr=1e-3),
                                       run=run("sft")), log=lambda *_: None)
    before = CausalLM.from_pretrained(sft).state_dict()
    config = AgentGRPOConfig(model=str(sft), train_data=str(shop.paths.train), env=shop.env,
                             steps=2, tasks_per_step=2, group_size=2, dynamic_sampling=False,
                             # the shop's own budget (4) ends every episode: strict is known
                             trajectory=TrajectoryConfig(max_turns=4, max_turn_tokens=16,
                                                         max_total_tokens=500),
                             optim=OptimConfig(lr=1e-3), run=run("grpo", save_every=1))
    final = run_agent_grpo(config, log=lambda *_: None)
    after = CausalLM.from_pretrained(final).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    metrics = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text()
               .splitlines()]
    logged = {k for m in metrics for k in m}
    assert {"reward", "turns", "model_tokens", "prefix_hit", "loss", "strict"} <= logged
    assert any("checkpoint" in p.name for p in (tmp_path / "grpo").iterdir())
    heldout = load_shop_tasks(shop.paths.heldout)
    stats, trajectories = evaluate_agent(
        LLM(CausalLM.from_pretrained(final).eval(), shop.tokenizer), shop.tokenizer, shop.env,
        heldout, TrajectoryConfig(max_turns=3, max_turn_tokens=16, temperature=0.0))
    assert [t.task for t in trajectories] == heldout and 0.0 <= stats["reward"] <= 1.5


def test_agent_configs_reject_bad_settings():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        AgentGRPOConfig(model="m", train_data="t", group_size=1)
    with pytest.raises(ValueError, match="multiple of updates_per_batch"):
        AgentGRPOConfig(model="m", train_data="t", tasks_per_step=3, updates_per_batch=2)
    with pytest.raises(ValueError, match="routing_replay old"):
        AgentGRPOConfig(model="m", train_data="t", loss=LossConfig(routing_replay="old"))
    with pytest.raises(ValueError, match="rows_per_step"):
        AgentSFTConfig(model="m", train_data="t", rows_per_step=0)
    from livethinking.train.config import GRPOConfig

    with pytest.raises(ValueError, match="multi-turn"):
        GRPOConfig(model="m", train_data="t", loss=LossConfig(credit="chunk"))
    assert replace(AgentGRPOConfig(model="m", train_data="t")).loss.credit == "chunk"


def test_the_shipped_agent_configs_load():
    from pathlib import Path

    from livethinking.train.config_io import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    grpo = load_config(AgentGRPOConfig, root / "agent_grpo.yaml", ["steps=3"])
    assert grpo.loss.credit == "chunk" and grpo.env.name == "shop" and grpo.steps == 3
    sft = load_config(AgentSFTConfig, root / "agent_sft.yaml", [])
    assert sft.env.config["catalogue"].endswith("catalogue.jsonl")


def test_routing_replay_uses_the_engines_experts_aligned_with_the_rows(shop, tmp_path):
    """R3 for agents: the last turn's routes cover every earlier token; at the sampler's
    own weights the replayed experts are the router's own at every loss position (a
    misaligned row would disagree on most of them)."""
    config = AgentGRPOConfig(model=str(shop.student), train_data=str(shop.paths.train),
                             env=shop.env, steps=1, tasks_per_step=2, group_size=2,
                             dynamic_sampling=False, loss=LossConfig(routing_replay="rollout"),
                             trajectory=TrajectoryConfig(max_turns=3, max_turn_tokens=12,
                                                         max_total_tokens=400),
                             optim=OptimConfig(lr=1e-3),
                             run=RunConfig(output_dir=str(tmp_path / "r3"), progress=False,
                                           tensorboard=False, plots=False))
    run_agent_grpo(config, log=lambda *_: None)
    metrics = json.loads((tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["router_disagreement"] < 0.02
