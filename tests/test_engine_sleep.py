"""Sleep mode: the engine releases its KV pool (and CUDA graphs) between rollouts and
training and takes it back, with the same outputs and the weights untouched."""

import gc
import weakref

import pytest
import torch

from livethinking.engine import LLM, SamplingParams
from livethinking.model import CausalLM


def _outputs(llm, prompts, params):
    return [[(list(c.token_ids), list(c.logprobs or [])) for c in o.outputs]
            for o in llm.generate(prompts, params)]


def test_sleep_releases_the_pool_and_wake_gives_the_same_samples(tiny_checkpoint):
    model = CausalLM.from_pretrained(tiny_checkpoint).eval()
    llm = LLM(model, num_kv_blocks=64, block_size=16, max_model_len=256)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = [SamplingParams(temperature=0.0, max_tokens=6),
              SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6)]
    before = _outputs(llm, prompts, params)
    pool = weakref.ref(llm.engine.runner.cache.k)
    freed = llm.sleep()
    gc.collect()
    assert llm.is_sleeping and pool() is None and freed > 0
    assert llm.sleep() == 0  # twice: nothing more to release
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(prompts, params)
    weight = model.lm_head.weight.clone()
    llm.wake_up()
    assert not llm.is_sleeping and llm.engine.stats().kv_blocks_total == 64
    hits = llm.engine.stats().prefix_cache_hit_tokens
    assert _outputs(llm, prompts, params) == before  # bit for bit
    assert llm.engine.stats().prefix_cache_hit_tokens == hits  # the cache went with the pool
    assert torch.equal(model.lm_head.weight, weight)
    fresh = LLM(CausalLM.from_pretrained(tiny_checkpoint).eval(), num_kv_blocks=64,
                block_size=16, max_model_len=256)
    assert _outputs(fresh, prompts, params) == before
    llm.sleep()
    with pytest.raises(ValueError, match="num_kv_blocks=3"):
        llm.wake_up(num_kv_blocks=3)
    assert llm.is_sleeping
    llm.wake_up(num_kv_blocks=40)
    assert llm.engine.stats().kv_blocks_total == 40
    assert _outputs(llm, prompts, params) == before


def test_sleep_refuses_unfinished_requests_and_keeps_routes(tiny_checkpoint):
    model = CausalLM.from_pretrained(tiny_checkpoint).eval()
    llm = LLM(model, num_kv_blocks=64, block_size=16, max_model_len=256,
              enable_return_routed_experts=True)
    params = SamplingParams(temperature=0.0, max_tokens=5, return_routed_experts=True)
    (before,) = llm.generate([[5, 6, 7, 8]], params)
    llm.engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="unfinished"):
        llm.sleep()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.sleep()
    assert llm.engine.runner.routes is None
    llm.wake_up()
    (after,) = llm.generate([[5, 6, 7, 8]], params)
    assert after.outputs[0].token_ids == before.outputs[0].token_ids
    assert torch.equal(torch.as_tensor(after.outputs[0].routed_experts),
                       torch.as_tensor(before.outputs[0].routed_experts))


@pytest.mark.gpu
def test_sleep_returns_the_pool_to_the_gpu(tiny_checkpoint):
    """On CUDA the released pool (and graphs) leave torch's allocated memory; waking takes
    the same blocks back."""
    model = CausalLM.from_pretrained(tiny_checkpoint, device="cuda").eval()
    llm = LLM(model, num_kv_blocks=512, block_size=16, max_model_len=256)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4))
    torch.cuda.synchronize()
    awake = torch.cuda.memory_allocated()
    freed = llm.sleep()
    assert awake - torch.cuda.memory_allocated() >= freed > 0
    llm.wake_up()
    assert llm.engine.stats().kv_blocks_total == 512
