"""Tokens/s of livethinking's CausalLM against transformers on the same weights.

    pytest benchmarks/bench_model.py          # CPU: a tiny Qwen3-MoE; GPU cases where CUDA exists

Forward (logits) and forward+backward (sum of logits) for ours and transformers'
Qwen3MoeForCausalLM (its default experts and attention implementations) loaded with the
same weights; and a decode step: B rows of C cached tokens each, one new token per row to
logits — ours through the engine's paged KV cache (``PagedKVCache``: its decode attention
reads the pool in place), transformers through its ``DynamicCache`` (cropped back to C after
each timed step, so every step sees the same context). ``benchmark.extra_info["tokens_per_s"]`` holds the throughput; the ratio
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


DECODE_CASES = [pytest.param("cpu", torch.float32, CPU_MODEL, 16, 128, id="cpu-tiny-moe-16x128ctx"),
                pytest.param("cpu", torch.float32, CPU_MODEL, 64, 256, id="cpu-tiny-moe-64x256ctx")]


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


def _paged_decode_step(model, batch, context, device, dtype):
    """A step() decoding one token per row after ``context`` prefilled tokens (ours)."""
    from livethinking.engine.paged_cache import PagedKVCache

    config, block = model.config, 16
    per_row = -(-(context + 1) // block)
    cache = PagedKVCache(config.num_hidden_layers, batch * per_row, block, config.num_key_value_heads,
                         config.head_dim, dtype=dtype, device=device)
    tables = torch.arange(batch * per_row, device=device).view(batch, per_row)
    ids = torch.randint(0, config.vocab_size, (batch, context), device=device)
    positions = torch.arange(context, device=device).expand(batch, context)
    slots = (tables[:, positions[0] // block] * block + positions[0] % block)
    with torch.no_grad():
        cache.set_batch(positions, slots, tables, torch.full((batch,), context, device=device),
                        fresh=True)
        model.forward_step_hidden(ids, positions, cache)
    new = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    position = torch.full((batch, 1), context, device=device)
    slot = tables[:, context // block, None] * block + context % block
    lengths = torch.full((batch,), context + 1, device=device)

    def step():
        with torch.no_grad():
            cache.set_batch(position, slot, tables, lengths)
            return model.compute_logits(model.forward_step_hidden(new, position, cache)[:, -1])
    return step


def _hf_decode_step(model, batch, context, device):
    """The same for transformers, with its DynamicCache cropped back after each step."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, vocab, (batch, context), device=device), past_key_values=cache,
              use_cache=True)
    new = torch.randint(0, vocab, (batch, 1), device=device)
    position = torch.full((batch, 1), context, device=device)

    def step():
        with torch.no_grad():
            out = model(new, position_ids=position, past_key_values=cache, use_cache=True,
                        cache_position=position[0]).logits[:, -1]
        cache.crop(-1)  # back to the context tokens
        return out
    return step


@pytest.mark.parametrize("impl", ["livethinking", "transformers"])
@pytest.mark.parametrize("device,dtype,shape,batch,context", DECODE_CASES)
def test_decode_step_throughput(benchmark, impl, device, dtype, shape, batch, context):
    ours, hf = build_pair(device, dtype, shape)
    step = (_paged_decode_step(ours.eval(), batch, context, device, dtype) if impl == "livethinking"
            else _hf_decode_step(hf.eval(), batch, context, device))
    benchmark.group = f"model {device} decode step {batch} rows x {context} cached tokens"
    benchmark.pedantic(synchronized(device, step), rounds=20, warmup_rounds=2)
    benchmark.extra_info["tokens_per_s"] = batch / benchmark.stats["median"]
