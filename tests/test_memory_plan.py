"""The memory planner: its activation figures against the bytes autograd actually keeps
for backward (saved-tensor hooks, CPU, bf16), its state figures against the optimizer's
real tensors, and ``livethinking plan`` on a folder holding only a Hugging Face
``config.json``."""

import json
import subprocess
import sys

import pytest
import torch

from livethinking.model import CausalLM, ModelConfig
from livethinking.train.config import (GRPOConfig, LossConfig, OptimConfig, RFTConfig,
                                       RolloutConfig, TeacherConfig)
from livethinking.train.memory_plan import activation_bytes_per_token, plan_memory
from livethinking.train.optim import MasterWeightAdamW


def _config(moe=True, **kw):
    base = dict(model_type="qwen3_moe" if moe else "qwen3", vocab_size=211, hidden_size=48,
                intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                moe_intermediate_size=24, num_experts=16 if moe else 0, num_experts_per_tok=4,
                norm_topk_prob=True, eos_token_id=1, pad_token_id=0)
    return ModelConfig(**(base | kw))


def _saved_bytes(model, tokens: int, checkpointing: bool) -> int:
    """Bytes of the non-parameter storages autograd saves in one training forward."""
    model.train()
    model.gradient_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(2, model.config.vocab_size, (1, tokens),
                        generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_hidden(ids)
    out.hidden_states.float().sum().backward()
    return sum(v for k, v in storages.items() if k not in params)


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("kw", [{}, {"hidden_size": 96, "num_experts_per_tok": 2},
                                {"num_attention_heads": 8, "num_key_value_heads": 1,
                                 "num_hidden_layers": 5}])
@pytest.mark.parametrize("tokens", [97, 512])
def test_activations_are_within_15_percent_of_what_autograd_keeps(moe, kw, tokens):
    config = _config(moe, **kw)
    torch.manual_seed(0)
    model = CausalLM(config).to(torch.bfloat16)
    for checkpointing in (False, True):
        kept, recomputed = activation_bytes_per_token(config, checkpointing=checkpointing)
        measured = _saved_bytes(model, tokens, checkpointing)
        assert kept * tokens == pytest.approx(measured, rel=0.15), (checkpointing, measured)
        if checkpointing:  # the one layer recomputed in backward: a plain layer's share
            plain, _ = activation_bytes_per_token(config, checkpointing=False)
            assert recomputed < plain / config.num_hidden_layers * 1.5


def test_state_figures_are_the_optimizers_tensors():
    """One process, bf16: parameters, their gradients, the fp32 masters, the masters'
    gradients at the step and Adam's two moments, as MasterWeightAdamW holds them."""
    config = _config()
    model = CausalLM(config).to(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), OptimConfig(lr=1e-3), 10)
    ids = torch.randint(2, config.vocab_size, (1, 64))
    model.compute_logits(model.forward_hidden(ids).hidden_states).float().logsumexp(-1).sum(
        ).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optimizer.step()
    state = [t for s in optimizer.optimizer.state.values() for t in s.values()
             if torch.is_tensor(t) and t.numel() > 1]
    measured = {"parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
                "gradients": grads,
                "fp32_masters": sum(m.numel() * m.element_size() for m in optimizer.master),
                "master_gradients": sum(m.numel() * 4 for m in optimizer.master),
                "adam_moments": sum(t.numel() * t.element_size() for t in state)}
    rft = RFTConfig(model="m", train_data="t", row_tokens=64, teacher=TeacherConfig(kind="demo"))
    plan = plan_memory(rft, config, gpus=1, gpu_memory=80 * 2**30)
    for key, value in measured.items():
        assert plan.per_rank[key] == value, key


def test_sharding_divides_the_state_and_adds_the_gathered_layers():
    """bf16 under FSDP2 (mixed precision): fp32 shards that are the masters, fp32
    gradients, Adam — 16 bytes per parameter over N, against 2 + 2 + 4 + 8 in one
    process (+ 4 for the masters' gradients at the step)."""
    config = _config()
    grpo = GRPOConfig(model="m", train_data="t")
    one = plan_memory(grpo, config, gpus=1, gpu_memory=80 * 2**30).per_rank
    eight = plan_memory(grpo, config, gpus=8, gpu_memory=80 * 2**30).per_rank
    params = one["parameters"] // 2
    assert one["gradients"] == 2 * params and one["fp32_masters"] == 4 * params
    for key, per_param in (("parameters", 4), ("gradients", 4), ("adam_moments", 8),
                           ("fp32_masters", 0), ("master_gradients", 0)):
        assert eight[key] == per_param * params // 8, key
    assert one["unsharded_layers"] == 0 < eight["unsharded_layers"]
    assert one["rollout_copy"] == 0 < eight["rollout_copy"]  # one process shares the policy
    assert eight["activations"] == one["activations"]


def test_reference_offload_and_freed_kv_pool_lower_the_peak():
    """``loss.reference_offload`` leaves on the device only the parts outside the decoder
    layers and one layer (two under FSDP2); ``rollout.free_cache_engine`` takes the KV
    pool out of what is resident while training (the peak is the larger phase)."""
    import dataclasses

    config = _config(num_hidden_layers=48)  # as 30B-A3B: the layers hold most parameters
    base = GRPOConfig(model="m", train_data="t", loss=LossConfig(beta=0.04),
                      rollout=RolloutConfig(free_cache_engine=False))
    offloaded = dataclasses.replace(base, loss=LossConfig(beta=0.04, reference_offload=True))
    freed = dataclasses.replace(base, rollout=RolloutConfig(free_cache_engine=True))
    gb = 80 * 2**30
    for gpus in (1, 4):
        a = plan_memory(base, config, gpus=gpus, gpu_memory=gb)
        b = plan_memory(offloaded, config, gpus=gpus, gpu_memory=gb)
        assert 0 < b.per_rank["reference_model"] < a.per_rank["reference_model"]
        assert a.total_per_rank - b.total_per_rank == \
            a.per_rank["reference_model"] - b.per_rank["reference_model"]
        c = plan_memory(freed, config, gpus=gpus, gpu_memory=gb)
        phases = max(c.per_rank["kv_pool"], c.per_rank["activations"]
                     + c.per_rank["loss_workspace"], c.per_rank["master_gradients"])
        resident = sum(c.per_rank.values()) - c.per_rank["kv_pool"] - c.per_rank[
            "activations"] - c.per_rank["loss_workspace"] - c.per_rank["master_gradients"]
        assert c.total_per_rank == resident + phases < a.total_per_rank
        assert c.settings["free_cache_engine"] and not a.settings["free_cache_engine"]


def _hf_config_folder(tmp_path, **overrides):
    from transformers import Qwen3MoeConfig

    values = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                  num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, moe_intermediate_size=768, num_experts=128,
                  num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                  tie_word_embeddings=False) | overrides
    folder = tmp_path / "qwen3-30b-a3b"
    folder.mkdir()
    (folder / "config.json").write_text(Qwen3MoeConfig(**values).to_json_string())
    return folder


def _plan(tmp_path, folder, *args):
    config = tmp_path / "grpo.yaml"
    config.write_text(f"model: {folder}\ntrain_data: unused.jsonl\nprompts_per_step: 32\n"
                      "loss: {beta: 0.04}\n")
    return subprocess.run([sys.executable, "-m", "livethinking", "plan", "--config",
                           str(config), "--json", *args], capture_output=True, text=True,
                          timeout=120)


def test_plan_reads_a_bare_config_json_and_says_what_makes_it_fit(tmp_path):
    folder = _hf_config_folder(tmp_path)
    result = _plan(tmp_path, folder, "--gpus", "8", "--gpu-memory", "80GiB")
    assert result.returncode == 1, result.stderr
    plan = json.loads(result.stdout)
    assert plan["settings"]["parameters"] == pytest.approx(30.5e9, rel=0.01)  # 30B-A3B
    assert not plan["fits"] and plan["short_by"] > 0
    assert plan["total_per_rank"] > plan["usable"] == int(0.92 * 80 * 2**30)
    assert set(plan["per_rank"]) >= {"parameters", "gradients", "fp32_masters",
                                     "adam_moments", "activations", "kv_pool", "rollout_copy",
                                     "reference_model"}
    assert "activation_checkpointing: true" in plan["suggestion"]
    fixed = _plan(tmp_path, folder, "--gpus", "8", "--gpu-memory", "80GiB",
                  "--layout", "disaggregated", "activation_checkpointing=true", "loss.beta=0")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["fits"]
    missing = _plan(tmp_path, tmp_path / "nowhere", "--gpus", "1")
    assert missing.returncode == 2 and "config.json" in missing.stderr


def test_parameter_count_is_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _hf_config_folder(tmp_path, num_hidden_layers=2, num_experts=8, hidden_size=64,
                               intermediate_size=96, moe_intermediate_size=32,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=500)
    hf = AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.from_pretrained(folder))
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    rft = RFTConfig(model="m", train_data="t", row_tokens=64, teacher=TeacherConfig(kind="demo"))
    plan = plan_memory(rft, config, gpus=1, gpu_memory=2**34)
    assert plan.settings["parameters"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.gpu
def test_planned_training_memory_is_within_15_percent_of_cuda_peak():
    """On CUDA, bf16: the peak of one microbatch's forward, backward and optimizer step
    (torch.cuda.max_memory_allocated) against the plan (one process, no engine)."""
    config = _config(hidden_size=256, num_hidden_layers=4, moe_intermediate_size=128,
                     intermediate_size=512, vocab_size=4096, num_experts=16,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    model = CausalLM(config).to("cuda", torch.bfloat16)
    tokens = 4096
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # the parameters
    optimizer = MasterWeightAdamW(model.parameters(), OptimConfig(lr=1e-3), 10)
    ids = torch.randint(2, config.vocab_size, (1, tokens), device="cuda")
    model.train()
    model.forward_hidden(ids).hidden_states.float().sum().backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    rft = RFTConfig(model="m", train_data="t", row_tokens=tokens, micro_batch_tokens=tokens,
                    teacher=TeacherConfig(kind="demo"))
    plan = plan_memory(rft, config, gpus=1, gpu_memory=80 * 2**30)
    planned = plan.total_per_rank - plan.per_rank["parameters"] - plan.per_rank["loss_workspace"]
    assert planned == pytest.approx(peak, rel=0.15)
