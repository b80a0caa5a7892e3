"""Tokens/s of livethinking's CausalLM against transformers on the same weights.

    pytest benchmarks/bench_model.py          # CPU: a tiny Qwen3-MoE; GPU cases where CUDA exists

Forward (logits) and forward+backward (sum of logits) for ours and transformers'
Qwen3MoeForCausalLM (its default experts and attention implementations) loaded with the
same weights. ``benchmark.extra_info["tokens_per_s"]`` holds the throughput; the ratio
is ours / transformers in the same run. GPU: Qwen3-30B-A3B layer shapes (H=2048, 128
experts, top-8, I=768, 32/4 heads) with 2 layers, bf16.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from livethinking.model import CausalLM, ModelConfig

CPU_MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 num_experts=16, num_experts_per_tok=2, norm_topk_prob=True)
GPU_MODEL = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                 num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
CASES = [pytest.param("cpu", torch.float32, CPU_MODEL, 1, 512, id="cpu-tiny-moe-512tok")]
if torch.cuda.is_available():
    CASES += [pytest.param("cuda", torch.bfloat16, GPU_MODEL, 1, 4096, id="cuda-30b-shapes-2layers-4096tok")]


def build_pair(device, dtype, shape):
    """(ours, transformers) with identical weights."""
    torch.manual_seed(0)
    hf_config = transformers.Qwen3MoeConfig(**shape, max_position_embeddings=8192)
    hf = transformers.Qwen3MoeForCausalLM(hf_config).to(device, dtype)
    ours = CausalLM(ModelConfig.from_dict(hf_config.to_dict())).to(device, dtype)
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def synchronized(device, fn):
    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("impl", ["livethinking", "transformers"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("device,dtype,shape,batch,length", CASES)
def test_model_throughput(benchmark, impl, mode, device, dtype, shape, batch, length):
    ours, hf = build_pair(device, dtype, shape)
    model = ours if impl == "livethinking" else hf
    ids = torch.randint(0, shape["vocab_size"], (batch, length), device=device)

    def logits():
        return model(ids) if impl == "livethinking" else model(ids).logits

    if mode == "forward":
        def step():
            with torch.no_grad():
                return logits()
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            logits().float().sum().backward()

    benchmark.group = f"model {device} {mode} {batch}x{length} tokens"
    benchmark.pedantic(synchronized(device, step), rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = batch * length / benchmark.stats["median"]
