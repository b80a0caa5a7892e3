"""pytest-benchmark: each compiled routing op against its plain-PyTorch reference.

    pytest benchmarks/bench_moe_routing.py                       # CPU: T=4096, E=128, k=8
    pytest benchmarks/bench_moe_routing.py --benchmark-json=out.json

Cases are grouped per op and shape, so pytest-benchmark prints ours and the reference
side by side. The references are the ones the tests hold the ops to
(livethinking.ops.reference). CUDA cases (bigger shapes) run only where a GPU exists;
they synchronise inside the timed call so wall-clock times are device times.
"""

from __future__ import annotations

import pytest
import torch

from livethinking.ops import moe_align, moe_permute, moe_topk_softmax, moe_unpermute
from livethinking.ops.reference import (
    moe_align_reference,
    moe_permute_reference,
    moe_topk_softmax_reference,
    moe_unpermute_reference,
)

NUM_EXPERTS, TOP_K, BLOCK_SIZE = 128, 8, 64
SHAPES = [pytest.param("cpu", 4096, 2048, id="cpu-T4096-H2048")]
if torch.cuda.is_available():
    SHAPES += [pytest.param("cuda", 16384, 2048, id="cuda-T16384-H2048"),
               pytest.param("cuda", 64, 2048, id="cuda-T64-H2048")]


def synchronized(device: str, fn):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def routing_inputs(device: str, num_tokens: int, hidden: int):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen).to(device)
    weights, ids = moe_topk_softmax(logits, TOP_K)
    alignment = moe_align(ids, NUM_EXPERTS, BLOCK_SIZE)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device, torch.bfloat16)
    rows = torch.randn(alignment.sorted_ids.numel(), hidden, generator=gen).to(device, torch.bfloat16)
    return logits, weights, ids, alignment, x, rows


@pytest.mark.parametrize("impl", ["livethinking", "reference"])
@pytest.mark.parametrize("device,num_tokens,hidden", SHAPES)
def test_moe_topk_softmax(benchmark, impl, device, num_tokens, hidden):
    logits = routing_inputs(device, num_tokens, hidden)[0]
    fn = moe_topk_softmax if impl == "livethinking" else moe_topk_softmax_reference
    benchmark.group = f"moe_topk_softmax {device} T={num_tokens} E={NUM_EXPERTS} k={TOP_K}"
    benchmark(synchronized(device, lambda: fn(logits, TOP_K, True)))


@pytest.mark.parametrize("impl", ["livethinking", "reference"])
@pytest.mark.parametrize("device,num_tokens,hidden", SHAPES)
def test_moe_align(benchmark, impl, device, num_tokens, hidden):
    ids = routing_inputs(device, num_tokens, hidden)[2]
    fn = moe_align if impl == "livethinking" else moe_align_reference
    benchmark.group = f"moe_align {device} T={num_tokens} E={NUM_EXPERTS} k={TOP_K} block={BLOCK_SIZE}"
    benchmark(synchronized(device, lambda: fn(ids, NUM_EXPERTS, BLOCK_SIZE)))


@pytest.mark.parametrize("impl", ["livethinking", "reference", "index_select"])
@pytest.mark.parametrize("device,num_tokens,hidden", SHAPES)
def test_moe_permute(benchmark, impl, device, num_tokens, hidden):
    """index_select: torch's own row gather into a new tensor, a floor for any gather
    (it skips the zeroing of padding rows, so it does slightly less work)."""
    _, _, _, alignment, x, _ = routing_inputs(device, num_tokens, hidden)
    if impl == "livethinking":
        call = lambda: moe_permute(x, alignment)  # noqa: E731
    elif impl == "reference":
        call = lambda: moe_permute_reference(x, alignment.sorted_ids, TOP_K)  # noqa: E731
    else:
        tokens = (alignment.sorted_ids.clamp(max=alignment.sentinel - 1) // TOP_K).long()
        call = lambda: x.index_select(0, tokens)  # noqa: E731
    benchmark.group = f"moe_permute {device} T={num_tokens} H={hidden} bf16"
    benchmark(synchronized(device, call))


@pytest.mark.parametrize("impl", ["livethinking", "reference"])
@pytest.mark.parametrize("device,num_tokens,hidden", SHAPES)
def test_moe_unpermute(benchmark, impl, device, num_tokens, hidden):
    _, weights, _, alignment, _, rows = routing_inputs(device, num_tokens, hidden)
    if impl == "livethinking":
        call = lambda: moe_unpermute(rows, alignment, weights)  # noqa: E731
    else:
        call = lambda: moe_unpermute_reference(rows, alignment.row_of_pair, weights)  # noqa: E731
    benchmark.group = f"moe_unpermute {device} T={num_tokens} H={hidden} bf16"
    benchmark(synchronized(device, call))
