"""The GRPO trainer object at the level of one update: several optimizer steps per rollout
batch, importance weights of external rollouts, the logged reward parts, L_ref sampling."""

import copy
from types import SimpleNamespace

import pytest
import torch

from livethinking import ops
from livethinking.data import LivestreamRecord
from livethinking.model import CausalLM
from livethinking.train import GRPOConfig, LossConfig, OptimConfig, RewardConfig, RolloutConfig
from livethinking.train import grpo
from livethinking.train.distributed import DistributedContext
from livethinking.train.grpo_step import build_batch, completion_logprobs
from livethinking.train.loop import TrainingRun
from livethinking.train.optim import MasterWeightAdamW
from livethinking.train.rollout import Rollout

G = 4
RECORD = LivestreamRecord(id="r", product_doc="doc", question="q")


def _trainer(checkpoint, tmp_path, **config):
    model = CausalLM.from_pretrained(checkpoint).train()
    config = GRPOConfig(model=str(checkpoint), train_data="unused", prompts_per_step=2,
                        optim=OptimConfig(lr=1e-2, grad_clip=0.0, min_lr_ratio=1.0),
                        **config)
    trainer = grpo.GRPOTrainer(config)
    trainer.run = TrainingRun(tmp_path, torch.device("cpu"), torch.float32,
                              DistributedContext(), checkpoint, None, model, None,
                              lambda *_: None)
    trainer.run.optimizer = MasterWeightAdamW(model.parameters(), config.optim, 10)
    trainer.stream = grpo.PromptStream(1, seed=0)
    return trainer


def _rollouts(generator, vocab, groups=2):
    out = []
    for _ in range(groups * G):
        prompt = torch.randint(3, vocab, (5,), generator=generator).tolist()
        length = int(torch.randint(2, 7, (1,), generator=generator))
        completion = torch.randint(3, vocab, (length,), generator=generator).tolist()
        out.append(Rollout(RECORD, prompt, completion, "", None))
    return out


def test_updates_per_batch_recompute_old_logprobs_once_and_move_the_ratio(
        tiny_checkpoint, tmp_path, generator, monkeypatch):
    trainer = _trainer(tiny_checkpoint, tmp_path, updates_per_batch=2,
                       rollout=RolloutConfig(group_size=G), loss=LossConfig(loss_type="grpo"))
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return completion_logprobs(*args, **kwargs)

    monkeypatch.setattr(grpo, "completion_logprobs", counted)
    rollouts = _rollouts(generator, trainer.run.model.config.vocab_size)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    trainer.update(rollouts, advantages)
    assert len(calls) == 1  # the old log-probs: once, before the first update
    first, second = trainer.update_stats
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5)  # nothing has moved yet
    assert abs(second["ratio"] - 1.0) > 1e-3  # the first optimizer step moved the policy
    assert second["lr"] == first["lr"] and len(trainer.update_stats) == 2


def _direct_loss(model, batch, advantages, old, weights, loss):
    """fused_linear_grpo_loss called on the model's hidden states, outside the trainer."""
    with torch.no_grad():
        hidden = model.forward_hidden(batch.input_ids).hidden_states
        window = hidden.gather(1, batch.window[..., None].expand(-1, -1, hidden.shape[-1]))
        value, _ = ops.fused_linear_grpo_loss(
            window, model.lm_head.weight, batch.targets, batch.mask, advantages,
            old_logprobs=old, rollout_is_weights=weights, loss_type=loss.loss_type,
            epsilon_low=loss.epsilon_low, epsilon_high=loss.epsilon_high)
    return float(value)


@pytest.mark.parametrize("shift", [0.3, 1.5])  # e^0.3 < is_cap = 2 < e^1.5: capped
def test_external_rollouts_apply_truncated_importance_weights(tiny_checkpoint, tmp_path,
                                                              generator, shift):
    rollout = RolloutConfig(source="openai", base_urls=["http://unused"], served_model="m",
                            group_size=G)
    losses = {}
    for name, offset in (("matched", 0.0), ("shifted", shift)):
        trainer = _trainer(tiny_checkpoint, tmp_path, rollout=rollout, aux_loss=False)
        rollouts = _rollouts(torch.Generator().manual_seed(7), trainer.run.model.config.vocab_size,
                             groups=1)
        model = trainer.run.model
        batch = build_batch(rollouts, torch.device("cpu"))
        old = completion_logprobs(model, batch, 1.0)
        for b, r in enumerate(rollouts):  # the sampler saw each token as less likely by `offset`
            r.logprobs = (old[b, :len(r.completion_ids)] - offset).tolist()
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        weights = torch.exp(torch.full_like(old, offset)).clamp(max=2.0) * batch.mask
        expected = _direct_loss(copy.deepcopy(model), batch, advantages, old, weights,
                                trainer.config.loss)
        trainer.update(rollouts, advantages)
        (stats,) = trainer.update_stats
        assert stats["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        losses[name] = stats["loss"]
    assert losses["shifted"] == pytest.approx(losses["matched"] * min(2.0, float(torch.exp(
        torch.tensor(shift)))), rel=1e-4)  # uniform weights scale the loss


def test_reward_length_is_logged_as_it_enters_the_total():
    from livethinking.rewards.combined import RewardBreakdown

    breakdown = [RewardBreakdown(total=0.5, correctness=0.0, helpfulness=1.0, length=1.0),
                 RewardBreakdown(total=2.0, correctness=1.0, helpfulness=1.0, length=0.5)]
    gated = grpo.reward_stats(breakdown, length_needs_correct=True)
    assert gated["reward/length"] == pytest.approx(0.25)  # (0·1 + 1·0.5) / 2
    assert gated["reward/length_raw"] == pytest.approx(0.75)
    plain = grpo.reward_stats(breakdown, length_needs_correct=False)
    assert plain["reward/length"] == plain["reward/length_raw"] == pytest.approx(0.75)


def test_measure_l_ref_samples_like_the_rollouts(tiny_checkpoint):
    from transformers import AutoTokenizer

    seen = []

    class FakeLLM:
        def generate(self, prompts, params):
            seen.append(params)
            answer = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2, 3])])
            return [answer] * len(prompts)

    config = GRPOConfig(model="m", train_data="d", rollout=RolloutConfig(
        top_k=5, top_p=0.9, temperature=0.7, max_tokens=33), reward=RewardConfig())
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert grpo.measure_l_ref(config, FakeLLM(), tokenizer, [RECORD, RECORD]) == 3.0
    (params,) = seen
    assert (params.top_k, params.top_p, params.temperature, params.max_tokens) == (5, 0.9, 0.7,
                                                                                   33)


def test_routing_replay_old_replays_the_old_policys_experts(tiny_checkpoint, tmp_path,
                                                            generator, monkeypatch):
    """R2: the old-policy forward's experts are recorded once and every update's forward
    uses them; the second update (after an optimizer step with a large lr) reports how
    often its own router would have chosen otherwise."""
    seen = []
    original = grpo.policy_loss_backward

    def spy(model, batch, *args, **kwargs):
        seen.append(None if batch.routed_experts is None else batch.routed_experts.clone())
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss_backward", spy)
    for replay in ("none", "old"):
        seen.clear()
        trainer = _trainer(tiny_checkpoint, tmp_path, updates_per_batch=2,
                           rollout=RolloutConfig(group_size=G),
                           loss=LossConfig(loss_type="grpo", routing_replay=replay))
        model = trainer.run.model
        rollouts = _rollouts(torch.Generator().manual_seed(3), model.config.vocab_size)
        batch = build_batch(rollouts, torch.device("cpu"))
        _, expected = completion_logprobs(copy.deepcopy(model), batch, 1.0, return_routes=True)
        trainer.update(rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2))
        first, second = trainer.update_stats
        if replay == "none":
            assert seen == [None, None] and "router_disagreement" not in second
            continue
        rows = [s.shape[0] for s in seen]
        assert sum(rows) == len(rollouts) and all(s.shape[1:] == expected.shape[1:] for s in seen)
        assert torch.equal(torch.cat(seen).sort(0).values, expected.sort(0).values)
        assert first["router_disagreement"] == 0.0  # nothing moved before the first step
        assert 0.0 <= second["router_disagreement"] <= 1.0
        assert set(first) >= {"router_disagreement/0", "router_disagreement/1"}


def test_routing_replay_rollout_replays_the_engines_experts(tiny_checkpoint, tmp_path,
                                                            monkeypatch):
    """R3 with the in-process engine: the update's forward uses exactly the experts the
    engine chose for each rollout (a deterministic engine has the trainer's numerics, so
    the trainer's router agrees everywhere); a rollout without routes gets the trainer's
    own for the positions it lacks, and the filled fraction is reported."""
    from livethinking.engine import LLM
    from livethinking.train.rollout import engine_rollouts

    seen = []
    original = grpo.policy_loss_backward

    def spy(model, batch, *args, **kwargs):
        seen.append(batch)
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss_backward", spy)
    trainer = _trainer(tiny_checkpoint, tmp_path, rollout=RolloutConfig(group_size=G,
                                                                        max_tokens=6),
                       loss=LossConfig(loss_type="grpo", routing_replay="rollout"))
    model = trainer.run.model
    llm = LLM(copy.deepcopy(model).eval(), deterministic=True, enable_return_routed_experts=True)
    prompts = [[5, 17, 29, 41, 3], [8, 9, 10]]
    groups = engine_rollouts(llm, [RECORD, RECORD], prompts, trainer.config.rollout, [1, 2],
                             routes=True)
    rollouts = [r for g in groups for r in g]
    stats = trainer.update(rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2))
    (batch,) = seen
    for b, r in enumerate(rollouts):
        want = len(r.prompt_ids) + len(r.completion_ids) - 1
        assert torch.equal(batch.routed_experts[b, :want].cpu(), r.routed_experts.int())
    assert stats["routing_replay_filled"] == 0.0
    assert stats["router_disagreement"] == 0.0

    seen.clear()
    rollouts[3].routed_experts = rollouts[3].routed_experts[:4]  # a sampler that sent less
    trainer = _trainer(tiny_checkpoint, tmp_path, rollout=RolloutConfig(group_size=G,
                                                                        max_tokens=6),
                       loss=LossConfig(loss_type="grpo", routing_replay="rollout"))
    with torch.no_grad():  # the trainer's own experts before the update, as it fills them
        own = trainer.run.model.forward_hidden(build_batch(rollouts, torch.device(
            "cpu")).input_ids, return_routes=True).routed_experts
    stats = trainer.update(rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2))
    want = len(rollouts[3].prompt_ids) + len(rollouts[3].completion_ids) - 1
    needed = sum(len(r.prompt_ids) + len(r.completion_ids) - 1 for r in rollouts)
    assert stats["routing_replay_filled"] == pytest.approx((want - 4) / needed)
    assert torch.equal(seen[0].routed_experts[3, :4].cpu(), rollouts[3].routed_experts.int())
    assert torch.equal(seen[0].routed_experts[3, 4:want], own[3, 4:want])


def test_routing_replay_rollout_needs_a_sampler_that_reports_routes():
    with pytest.raises(ValueError, match="routing_replay rollout"):
        GRPOConfig(model="m", train_data="t", loss=LossConfig(routing_replay="rollout"),
                   rollout=RolloutConfig(source="openai", base_urls=["http://x"],
                                         served_model="m"))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_microbatches_give_the_gradients_of_one_batch(tiny_checkpoint, tmp_path, loss_type):
    """A minibatch run as several microbatches (``micro_batch_tokens`` small) accumulates
    the gradients and the loss of one forward over the whole minibatch, for every loss
    type, with old log-probs, importance weights and a reference term in play."""
    from livethinking.train.grpo_step import micro_batches

    grads, losses = [], []
    rollouts = _rollouts(torch.Generator().manual_seed(11), 320, groups=2)
    for budget in (10_000, 24):
        rollout = RolloutConfig(source="openai", base_urls=["http://unused"], served_model="m",
                                group_size=G, max_tokens=8)
        trainer = _trainer(tiny_checkpoint, tmp_path, rollout=rollout, aux_loss=False,
                           micro_batch_tokens=budget,
                           loss=LossConfig(loss_type=loss_type, beta=0.05, epsilon_high=0.28))
        model = trainer.run.model
        batch = build_batch(rollouts, torch.device("cpu"))
        g = torch.Generator().manual_seed(5)
        old = completion_logprobs(model, batch, 1.0) + 0.1 * torch.randn(
            batch.mask.shape, generator=g) * batch.mask
        ref = old + 0.2 * torch.randn(batch.mask.shape, generator=g) * batch.mask
        weights = torch.rand(batch.mask.shape, generator=g) * batch.mask
        advantages = torch.randn(len(rollouts), generator=g)
        rows = torch.arange(len(rollouts))
        model.zero_grad()
        stats = trainer._minibatch_backward(batch, rows, advantages, old, ref, weights)
        if budget == 24:
            lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
            assert stats["microbatches"] == len(micro_batches(lengths, 24)) > 2
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(stats["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    scale = max(float(g.abs().max()) for g in grads[0])
    for whole, micro in zip(*grads):
        torch.testing.assert_close(micro, whole, rtol=0, atol=2e-5 * scale)


def test_micro_batches_pack_rows_within_the_budget():
    from livethinking.train.grpo_step import micro_batches

    assert micro_batches([5, 5, 5, 9, 30, 2], 15) == [[0, 1, 2], [3], [4], [5]]
    assert micro_batches([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert micro_batches([], 8) == []
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        GRPOConfig(model="m", train_data="t", micro_batch_tokens=0)


def test_offloaded_reference_gives_the_same_logprobs_one_layer_on_the_device_at_a_time(
        tiny_checkpoint, tmp_path, generator):
    """``loss.reference_offload`` in one process: the reference's decoder layers stay in
    CPU memory and each is copied in only for its own forward (checked by storage: between
    forwards every layer holds its host tensors; during layer i's forward only layer i
    holds a copy); its log-probs equal the resident reference's bit for bit."""
    from livethinking.train.offload import offload_layers

    trainer = _trainer(tiny_checkpoint, tmp_path, loss=LossConfig(beta=0.1,
                                                                  reference_offload=True),
                       rollout=RolloutConfig(group_size=G))
    resident = CausalLM.from_pretrained(tiny_checkpoint).eval().requires_grad_(False)
    offloaded = trainer._reference(trainer.run)
    layers = list(offloaded.model.layers)
    host = [[p.data.untyped_storage().data_ptr() for p in layer.parameters()]
            for layer in layers]

    def on_host(layer):
        return [p.data.untyped_storage().data_ptr() for p in layer.parameters()] == \
            host[layers.index(layer)]

    during = []
    for layer in layers:
        layer.register_forward_hook(  # runs before offload's own hook drops the copy
            lambda module, args, out: during.append([on_host(m) for m in layers]),
            prepend=True)
    batch = build_batch(_rollouts(generator, resident.config.vocab_size), torch.device("cpu"))
    expected = completion_logprobs(resident, batch, 1.0)
    got = completion_logprobs(offloaded, batch, 1.0)
    assert torch.equal(expected, got)
    assert during == [[j != i for j in range(len(layers))] for i in range(len(layers))]
    assert all(on_host(layer) for layer in layers)
    with pytest.raises(ValueError, match="frozen"):
        offload_layers(CausalLM.from_pretrained(tiny_checkpoint), torch.device("cpu"))
